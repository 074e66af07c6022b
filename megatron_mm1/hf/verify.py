"""Compare a converted Hugging Face model with its source MM1 checkpoint on the same inputs.

Both run in fp32 (no TF32) on the run's device in this process, with the same weights (the
checkpoint's, whatever its dtype): the megatron MM1Model (TP = PP = EP = 1) and the
transformers model loaded from the folder.
Prompts are single unpacked sequences (a plain causal mask) with 0, 1 and 3 images at random
positions, in the synthetic data of megatron_mm1.synthetic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_mm1.config import Config
from megatron_mm1.device import check_placement, device
from megatron_mm1.hf.megatron_io import MegatronCheckpoint
from megatron_mm1.synthetic import synthetic_microbatch

IMAGE_COUNTS = (0, 1, 3)


def prompts(cfg: Config, text_only: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One-row prompts: tokens [1, s] and images [n, 3, S, S], padding cut off."""
    out = []
    for k, count in enumerate((0,) if text_only else IMAGE_COUNTS):
        batch = synthetic_microbatch(cfg, seed=seed + k, images_per_row=[count], samples_per_row=1)
        used = batch["segment_ids"][0] > 0
        out.append({"tokens": batch["tokens"][:, used], "images": batch["images"]})
    return out


def megatron_model(ckpt: MegatronCheckpoint):
    """The checkpoint's MM1Model in fp32, filled group by group."""
    from megatron_mm1.models.mm1 import build_model
    from megatron_mm1.runtime import single_process

    fp32 = dataclasses.replace(ckpt.cfg, training=dataclasses.replace(ckpt.cfg.training, bf16=False))
    (model,) = build_model(single_process(fp32))
    model.eval()
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for names in ckpt.groups().values():
            for name, tensor in ckpt.read(names).items():
                params[name].copy_(tensor)
    return model


def megatron_logits(model, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab]: the true vocabulary's logits (an exported model has no padded ids)."""
    with torch.no_grad():  # one sample per row: plain causal attention
        logits = model(tokens, torch.ones_like(tokens, dtype=torch.int32), images=images)
    return logits[..., : model.vocab_size].float()


def hf_model(hf_dir: str | Path, text_only: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if text_only:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32)
    model = model.to(device()).eval()
    check_placement([model])
    return model


def hf_logits(model, tokens: torch.Tensor, images: torch.Tensor, text_only: bool) -> torch.Tensor:
    with torch.no_grad():
        if text_only:
            return model(input_ids=tokens).logits.float()
        return model(input_ids=tokens, pixel_values=images if len(images) else None).logits.float()


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """max |diff|, mean KL(reference || candidate) per token, top-1 agreement."""
    ref_logp = F.log_softmax(reference, dim=-1)
    cand_logp = F.log_softmax(candidate, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)
    return {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
    }


def verify(checkpoint: str | Path, hf_dir: str | Path, text_only: bool = False) -> dict[str, float]:
    """Worst case over the prompts of `compare`'s figures."""
    # Full fp32 on a GPU too: TF32 matmuls and convolutions differ from fp32 by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ckpt = MegatronCheckpoint(checkpoint)
    reference = megatron_model(ckpt)
    converted = hf_model(hf_dir, text_only)
    results = []
    for prompt in prompts(ckpt.cfg, text_only):
        tokens, images = prompt["tokens"].to(device()), prompt["images"].to(device())
        results.append(
            compare(megatron_logits(reference, tokens, images), hf_logits(converted, tokens, images, text_only))
        )
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "mean_kl": max(r["mean_kl"] for r in results),
        "top1_agreement": min(r["top1_agreement"] for r in results),
    }
