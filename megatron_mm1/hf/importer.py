"""`mm1 convert from-hf`: Hugging Face weights -> an MM1 checkpoint (config.yaml + model/).

Sources:
- an MM1 folder written by `to-hf`: everything, with the training config it carries;
- a native causal LM folder (hf_config.FAMILIES: Llama, Mistral, Qwen2, Qwen3, Mixtral,
  Qwen2-MoE, Qwen3-MoE): the LLM; the config is `--config` with the LLM's shape taken from the
  folder; plus optionally `--vision` a CLIP, SigLIP or SigLIP2 folder (the vision model or the
  composite one, e.g. CLIPVisionModel or SiglipModel) for the encoder. Parts without a source
  (the connector, or the encoder without --vision) keep their fresh initialisation (seed
  training.seed).

The checkpoint is written as megatron saves a one-process model (TP = PP = EP = 1);
dist_checkpointing reshards it on load. It is written one parameter at a time, each read from
its safetensors shard(s) when the writer asks for it, so memory stays near the largest
parameter; only a freshly initialised part (the connector, or an encoder without --vision)
is built whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megatron_mm1.checkpoint import save_config, write_manifest
from megatron_mm1.config import Config, ConfigError, _build, _merge, config_to_dict, load_config, parse_override
from megatron_mm1.hf.export import staging_dir
from megatron_mm1.hf.hf_io import HFFolder
from megatron_mm1.hf.hf_config import llm_fields_from_hf, vision_fields_from_hf
from megatron_mm1.hf.mapping import COMPOSITE_VISION_PREFIX, MM1_LLM_PREFIX, MM1_VISION_PREFIX, NameMap
from megatron_mm1.hf.megatron_io import sharded_layout, write_model
from megatron_mm1.models.mm1 import image_connector, vision_encoder
from megatron_mm1.runtime import single_process

# Parts a conversion may have no weights for, and how they are initialised instead.
FRESH_PARTS = {"vision": vision_encoder, "connector": image_connector}


def import_config(
    hf: HFFolder, vision: HFFolder | None, config: str | None, overrides: list[str]
) -> Config:
    """The MM1 config for these weights: the one an MM1 folder carries, or `config` (default
    mm1-3b) with the LLM (and encoder) shapes of the sources; `overrides` last."""
    if hf.config.get("model_type") == "mm1":
        tree = hf.config.get("mm1_config")
        if not tree:
            raise ConfigError(f"{hf.path}/config.json has no mm1_config (not written by mm1 convert to-hf)")
    else:
        tree = config_to_dict(load_config(config or "mm1-3b"))
        fields = llm_fields_from_hf(hf.config)
        tree["model"]["llm"].update(fields["llm"])  # rope_scaling whole: unset fields are defaults
        tree["model"]["moe"].update(fields["moe"])
        if vision is not None:
            tree["model"]["vision"].update(vision_fields_from_hf(vision.config))
    for item in overrides:
        _merge(tree, *parse_override(item))
    return _build(Config, tree)


def from_hf(
    hf_dir: str | Path,
    out: str | Path,
    vision_dir: str | Path | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Convert; returns `out`. Raises ConfigError for bad input, leaving nothing behind."""
    out = Path(out)
    tmp = staging_dir(out)
    hf = HFFolder(hf_dir)
    is_mm1 = hf.config.get("model_type") == "mm1"
    if is_mm1 and vision_dir is not None:
        raise ConfigError("--vision is for native LLM folders; an MM1 folder carries its encoder")
    vision = HFFolder(vision_dir, what="--vision") if vision_dir is not None else None
    cfg = import_config(hf, vision, config, overrides or [])
    # Which folder holds which part, under which prefix.
    if is_mm1:
        sources = [(NameMap(cfg, MM1_VISION_PREFIX, MM1_LLM_PREFIX, connector=True), hf)]
    else:
        sources = [(NameMap(cfg, None, "", connector=False), hf)]
        if vision is not None:
            sources.append((NameMap(cfg, vision_prefix(vision), None, connector=False), vision))
    single = single_process(cfg)

    def covering(name: str):
        return next(((m, src) for m, src in sources if m.covers(name)), None)

    layout = sharded_layout(single)
    fresh = {name.split(".")[0] for name in layout if covering(name) is None}
    if "llm" in fresh:
        raise ConfigError(f"{hf.path} does not hold the language model this configuration needs")
    check_every_tensor_used([name for name in layout if name.split(".")[0] not in fresh], sources)
    built = {part: build(single).state_dict() for part, build in FRESH_PARTS.items() if part in fresh}

    def tensor_for(name: str, like: torch.Tensor) -> torch.Tensor:
        found = covering(name)
        if found is None:
            part, rest = name.split(".", 1)
            return built[part][rest]
        return _read(name, like, *found).to(like.dtype)

    try:
        tmp.mkdir(parents=True)
        write_model(tmp / "model", layout, tensor_for, progress)
        save_config(cfg, tmp / "config.yaml")
        write_manifest(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fresh and progress:
        print(f"freshly initialised (no source weights): {', '.join(sorted(fresh))}")
    return out


def vision_prefix(vision: HFFolder) -> str:
    """Composite folders (CLIPModel, SiglipModel) and hub vision-model checkpoints keep the tower
    under `vision_model.`; a vision model's save_pretrained in transformers 5 writes it bare."""
    for prefix in (COMPOSITE_VISION_PREFIX, ""):
        if prefix + "embeddings.patch_embedding.weight" in vision:
            return prefix
    raise ConfigError(f"--vision {vision.path}: no vision tower weights (embeddings.patch_embedding.weight)")


def check_every_tensor_used(megatron_names: list[str], sources: list[tuple[NameMap, HFFolder]]) -> None:
    """Refuse, before anything is written, a source folder that lacks a tensor the model needs
    or holds one that the conversion would not read (a bias, a layer, an expert more than the
    config says), naming them."""
    problems = []
    for names, src in sources:
        needed = {n for name in megatron_names if names.covers(name) for n in names.hf_names(name)}
        missing = sorted(needed - set(src.names()))
        extra = sorted(n for n in set(src.names()) - needed if names.unused(n) is None)
        if missing:
            problems.append(f"{src.path} lacks {len(missing)} tensor(s) the model needs: {_some(missing)}")
        if extra:
            problems.append(
                f"{src.path} holds {len(extra)} tensor(s) that this configuration would not read: {_some(extra)}"
            )
    if problems:
        raise ConfigError("refusing an inexact conversion:\n  - " + "\n  - ".join(problems))


def _some(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _read(name: str, like: torch.Tensor, names: NameMap, src: HFFolder) -> torch.Tensor:
    hf_names = names.hf_names(name)
    tensor = names.from_hf(name, [src.get(n) for n in hf_names])
    if tensor.shape != like.shape:
        raise ConfigError(
            f"{src.path}: {', '.join(hf_names)} give shape {tuple(tensor.shape)} for {name}, "
            f"but the configuration needs {tuple(like.shape)}"
        )
    return tensor
