"""`mm1 convert to-hf`: an MM1 checkpoint (any layout) -> a Hugging Face folder.

    HF_DIR/config.json                  MM1Config (vision_config, text_config, connector, mm1_config)
    HF_DIR/configuration_mm1.py         \\ remote code: the connector and the composite model
    HF_DIR/modeling_mm1.py              /
    HF_DIR/model-0000i-of-0000N.safetensors + model.safetensors.index.json
    HF_DIR/generation_config.json, preprocessor_config.json, tokenizer files

With `text_only`, HF_DIR is the LLM alone as a native transformers causal LM (no remote code).
Everything is written into HF_DIR.tmp-<pid> and renamed at the end, so an interrupted
conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_mm1.config import Config, ConfigError, config_to_dict
from megatron_mm1.hf.hf_io import ShardWriter
from megatron_mm1.hf.hf_config import BOS_ID, EOS_ID, PAD_ID, text_config, vision_config
from megatron_mm1.hf.mapping import MM1_LLM_PREFIX, MM1_VISION_PREFIX, NameMap
from megatron_mm1.hf.megatron_io import MegatronCheckpoint

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_mm1.py", "modeling_mm1.py")


def staging_dir(out: Path) -> Path:
    """Refuse an existing output; the folder everything is written into before the rename."""
    if out.exists():
        raise ConfigError(f"output {out} already exists; remove it or choose another --out")
    return out.parent / f"{out.name}.tmp-{os.getpid()}"


def to_hf(
    checkpoint: str | Path,
    out: str | Path,
    text_only: bool = False,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = 2_000_000_000,
    progress: bool = True,
) -> Path:
    """Convert; returns `out`. Raises ConfigError for bad input, leaving nothing behind."""
    out = Path(out)
    tmp = staging_dir(out)
    ckpt = MegatronCheckpoint(checkpoint, progress=progress)
    cfg = ckpt.saved_cfg
    text_config(cfg)  # refuses, before any work, a model no transformers class reproduces
    names = NameMap(
        cfg,
        vision_prefix=None if text_only else MM1_VISION_PREFIX,
        llm_prefix="" if text_only else MM1_LLM_PREFIX,
        connector=not text_only,
    )
    tokenizer = tokenizer or cfg.data.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConfigError(f"tokenizer {tokenizer} does not exist (pass --tokenizer MODEL)")
    groups = {g: [n for n in ns if names.covers(n)] for g, ns in ckpt.groups().items()}
    groups = {g: ns for g, ns in groups.items() if ns}
    dtype = next(iter(ckpt.entries.values())).data.dtype
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, plan(ckpt, names, groups, dtype), max_shard_bytes)
        bar = tqdm(
            total=sum(ckpt.nbytes(ns) for ns in groups.values()), unit="B", unit_scale=True,
            desc="to-hf", disable=not progress,
        )
        for group, group_names in groups.items():
            for name, tensor in ckpt.read(group_names).items():
                for hf_name, part in names.to_hf(name, tensor).items():
                    writer.add(hf_name, part)
                bar.update(tensor.numel() * tensor.element_size())
            for hf_name, extra in names.extras(group, dtype).items():
                writer.add(hf_name, extra)
        bar.close()
        writer.finish()
        if tokenizer is not None:  # before config.json: transformers reads it to pick a class
            write_tokenizer(Path(tokenizer), tmp, cfg.model.image_token_id)
        _write_configs(cfg, tmp, text_only, dtype)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def plan(ckpt: MegatronCheckpoint, names: NameMap, groups: dict, dtype: torch.dtype) -> list:
    """(HF name, shape, dtype) of every tensor, in writing order: the conversion run on the
    meta-device tensors, which costs no memory."""
    out = []
    for group, group_names in groups.items():
        for name in group_names:
            for hf_name, part in names.to_hf(name, ckpt.entries[name].data).items():
                out.append((hf_name, tuple(part.shape), part.dtype))
        out += [(n, tuple(t.shape), t.dtype) for n, t in names.extras(group, dtype).items()]
    return out


def _write_configs(cfg: Config, folder: Path, text_only: bool, dtype: torch.dtype) -> None:
    from transformers import CONFIG_MAPPING, GenerationConfig

    from megatron_mm1.data.images import processor_config

    text = text_config(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    if text_only:
        config = CONFIG_MAPPING[text["model_type"]](**{k: v for k, v in text.items() if k != "model_type"})
    else:
        from megatron_mm1.hf.remote.configuration_mm1 import MM1Config

        c = cfg.model.connector
        config = MM1Config(
            vision_config=vision_config(cfg),
            text_config=text,
            connector_type=c.type,
            num_image_tokens=c.num_image_tokens,
            connector_hidden_size=c.hidden_size,
            connector_depth=c.depth,
            connector_mlp_depth=c.mlp_depth,
            vision_feature_layer=-1,  # only the layers up to the feature layer are exported
            image_token_id=cfg.model.image_token_id,
            mm1_config=config_to_dict(cfg),
            architectures=["MM1ForConditionalGeneration"],
        )
        config.auto_map = {
            "AutoConfig": "configuration_mm1.MM1Config",
            "AutoModelForImageTextToText": "modeling_mm1.MM1ForConditionalGeneration",
        }
        for file in REMOTE_FILES:
            shutil.copy(REMOTE_DIR / file, folder / file)
        processor = processor_config(cfg.model.vision.image_size, cfg.model.vision.arch)
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    config.dtype = dtype_name
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(folder)


def write_tokenizer(model_file: Path, folder: Path, image_token_id: int) -> None:
    """The SentencePiece model, converted once by transformers to a fast tokenizer
    (tokenizer.json) with `<image>` as a special token; tokenizer.model is kept too."""
    from transformers import AutoTokenizer

    shutil.copy(model_file, folder / "tokenizer.model")
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_special_tokens": ["<image>"],
        "add_bos_token": False, "add_eos_token": False,  # MM1's data pipeline adds none
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ConfigError(f"tokenizer {model_file} could not be converted for transformers: {e}") from None
    if tok.convert_tokens_to_ids("<image>") != image_token_id:
        raise ConfigError(f"tokenizer {model_file} has no <image> piece with id {image_token_id}")
    tok.save_pretrained(str(folder))
