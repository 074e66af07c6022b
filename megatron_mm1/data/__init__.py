"""MM1 data pipeline: corpus -> validated tar shards -> mixed, packed, resumable micro-batches.

Modules: formats (JSONL records, shards, manifest), readers (JSONL, webdataset, LLaVA and parquet
input), prepare, images (CLIP preprocessing), tokenizer (SentencePiece, ids unk=0 bos=1 eos=2
pad=3 <image>=4), packing (the batch contract and the packer), mixture (weighted, per-rank
sampling), loader (build_loader), demo, bench, cli.

The batch contract the model consumes is documented in `megatron_mm1.data.packing`.

    loader = build_loader(cfg, dp_rank, dp_size)   # cheap: reads manifests and the tokenizer only
    for batch in loader: ...                        # dict of tensors, see packing.py
    state = loader.state_dict()                     # JSON-serialisable; after the last batch taken
    loader.load_state_dict(state)                   # a fresh loader continues exactly from there

`build_loader` is imported lazily so that importing this package does not import torch.
"""


def __getattr__(name: str):
    if name in ("build_loader", "MultimodalLoader"):
        from megatron_mm1.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
