"""Layout planner: enumerate TP, PP (and virtual stages), EP, DP, micro-batch size and activation
recomputation for a GPU count, estimate each layout's per-GPU memory and relative throughput,
rank those that fit and say why the others do not.

Parameter counts per rank are exact (tests/test_planner.py checks them against real models
built at each layout). Memory and throughput are models; their assumptions are listed in
docs/performance.md and were not calibrated on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional

from megatron_mm1.config import Config, ConfigError, validate

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the device reports as usable
    peak_tflops: float  # bf16 dense


GPUS = {
    "h100-80gb": GPU("H100 SXM 80GB", 79.6, 989.0),
    "h200-141gb": GPU("H200 141GB", 139.8, 989.0),
    "a100-80gb": GPU("A100 SXM 80GB", 79.2, 312.0),
    "a100-40gb": GPU("A100 SXM 40GB", 39.4, 312.0),
}
GPUS_PER_NODE = 8
RESERVED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
# Compute efficiency relative to TP1 (per-layer collectives on NVLink); TP stays inside a node.
TP_EFFICIENCY = {1: 1.0, 2: 0.93, 4: 0.87, 8: 0.80}
MICRO_BATCH_EFFICIENCY = {1: 1.0, 2: 1.03, 4: 1.05}  # larger GEMMs run a little closer to peak


def measured_gpu(name: str, total_bytes: int) -> GPU:
    """The GPU a process sees (torch.cuda.get_device_properties' name and total_memory), with
    the bf16 peak of the listed GPU nearest in memory (the peak only labels; memory decides)."""
    memory = round(total_bytes / GIB, 1)
    nearest = min(GPUS.values(), key=lambda g: abs(g.memory_gib - memory))
    return GPU(name, memory, nearest.peak_tflops)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: Optional[int]
    ep: int
    etp: int
    dp: int
    micro_batch: int
    recompute: str  # training.recompute_llm: none | selective (attention core) | full (layers)
    sequence_parallel: bool  # the planner proposes it at every TP > 1; a config may turn it off

    def overrides(self) -> list[str]:
        """The `--set` overrides that select this layout."""
        sets = [
            f"parallel.tensor_model_parallel_size={self.tp}",
            f"parallel.pipeline_model_parallel_size={self.pp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"training.micro_batch_size={self.micro_batch}",
            f"training.recompute_llm={self.recompute}",
        ]
        if self.vpp:
            sets.append(f"parallel.virtual_pipeline_model_parallel_size={self.vpp}")
        if self.ep > 1:
            sets += [f"parallel.expert_model_parallel_size={self.ep}",
                     f"parallel.expert_tensor_parallel_size={self.etp}"]
        return sets

    def name(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"] + ([f"vpp{self.vpp}"] if self.vpp else [])
        parts += [f"ep{self.ep}", f"etp{self.etp}"] if self.ep > 1 else []
        name = "".join(parts) + f"dp{self.dp}-mbs{self.micro_batch}"
        name += "" if self.recompute == "none" else f"-rc-{self.recompute}"
        return name + ("-nosp" if self.tp > 1 and not self.sequence_parallel else "")


def apply_layout(cfg: Config, layout: Layout) -> Config:
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = layout.tp, layout.pp
    p.virtual_pipeline_model_parallel_size = layout.vpp
    p.sequence_parallel = layout.sequence_parallel
    p.expert_model_parallel_size = layout.ep
    p.expert_tensor_parallel_size = layout.etp if cfg.model.moe.num_experts else None
    cfg.training.micro_batch_size = layout.micro_batch
    cfg.training.recompute_llm = layout.recompute
    return cfg


# ----------------------------------------------------------------------------- parameters


def _connector_parameters(cfg: Config) -> int:
    """Plain torch, replicated on every TP rank: count the module itself on the meta device."""
    m = cfg.model
    return _count_connector(dataclasses.astuple(m.connector), m.vision.num_patches, m.vision.hidden_size, m.llm.hidden_size)


@functools.lru_cache(maxsize=None)
def _count_connector(connector: tuple, num_patches: int, vision_width: int, llm_width: int) -> int:
    # Cached: building the module takes ~60 ms, and a plan asks once per layout and stage.
    import torch

    from megatron_mm1.config import ConnectorConfig
    from megatron_mm1.models.connector import build_connector

    with torch.device("meta"):
        module = build_connector(ConnectorConfig(*connector), num_patches, vision_width, llm_width)
    return sum(p.numel() for p in module.parameters())


def _vision_parameters(cfg: Config, tp: int) -> int:
    v = cfg.model.vision
    w, f = v.hidden_size, v.ffn_hidden_size
    # conv; CLIP's class token or SigLIP's conv bias; positions; CLIP's ln_pre
    embed = 3 * v.patch_size**2 * w + w + v.sequence_length * w + (2 * w if v.arch == "clip" else 0)
    # Two LayerNorms; column-parallel QKV and fc1 shard weight and bias; row-parallel proj and
    # fc2 shard the weight and keep the whole bias.
    layer = 4 * w + (3 * w * w + 3 * w) // tp + w * w // tp + w + (w * f + f) // tp + w * f // tp + w
    return embed + v.num_layers_used * layer


def _chunk_layers(cfg: Config, pp_rank: int, vp_stage: int) -> range:
    p, n = cfg.parallel, cfg.model.llm.num_layers
    vpp = p.virtual_pipeline_model_parallel_size or 1
    per_chunk = n // (p.pipeline_model_parallel_size * vpp)
    start = vp_stage * (n // vpp) + pp_rank * per_chunk  # megatron-core's layer offset
    return range(start, start + per_chunk)


def rank_parameters(cfg: Config, pp_rank: int) -> dict[str, int]:
    """Exact parameter counts held by one rank of pipeline stage `pp_rank` (every TP and EP
    rank of a stage holds the same): `dense` (replicated over DP), `expert` (replicated over
    expert-DP), `total`."""
    llm, moe, p = cfg.model.llm, cfg.model.moe, cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    h, d = llm.hidden_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_query_groups * d
    attention = h + (q + 2 * kv) * (h + llm.qkv_bias) // tp + h * q // tp + (2 * d if llm.qk_layernorm else 0) + h
    dense_mlp = 3 * llm.ffn_hidden_size * h // tp
    expert_ffn = moe.ffn_hidden_size or llm.ffn_hidden_size
    dense = expert = 0
    for vp_stage in range(p.virtual_pipeline_model_parallel_size or 1):
        for i in _chunk_layers(cfg, pp_rank, vp_stage):
            dense += attention
            if moe.num_experts and i % moe.layer_freq == 0:
                dense += moe.num_experts * h  # the router, replicated
                expert += moe.num_experts // ep * 3 * expert_ffn * h // etp
            else:
                dense += dense_mlp
    if pp_rank == 0:  # first chunk: embeddings and the vision side
        dense += llm.vocab_size * h // tp + _vision_parameters(cfg, tp) + _connector_parameters(cfg)
    if pp_rank == pp - 1:  # last chunk: final norm and output layer (a tied one is the embedding)
        dense += h + (0 if llm.tie_embeddings and pp == 1 else llm.vocab_size * h // tp)
    return {"dense": dense, "expert": expert, "total": dense + expert}


# ----------------------------------------------------------------------------- memory


def layer_activation_bytes(cfg: Config, moe_layer: bool) -> dict[str, float]:
    """Bytes one LLM layer keeps for backward per token of a micro-batch, by the layer's
    submodule whose operations keep them (bf16 activations, fp32 statistics). Each term is a
    tensor that real layers save; tests/test_planner.py compares the sums with the saved
    tensors of real layers. The attention mask, shared by all layers, is `mask_bytes`."""
    llm, moe, p = cfg.model.llm, cfg.model.moe, cfg.parallel
    fast = cfg.model.layer_spec == "fast"
    tp = p.tensor_model_parallel_size
    sp = tp if p.sequence_parallel else 1  # the norms' side of the layer holds s / TP tokens
    h, s, heads = llm.hidden_size, cfg.data.seq_length, llm.num_attention_heads
    d = h // heads
    q, kv = heads * d, llm.num_query_groups * d
    norm = (2 * h + 4) / sp  # input, fp32 1/rms (one fused or compiled kernel)
    # The norm's output (QKV input), RoPE's cos and sin for Q and K, the output projection's input.
    attention = 2 * h / sp + 4 * 2 * d + 2 * q / tp
    if fast or cfg.training.recompute_llm == "selective":
        # The QKV output (V is a view of it), rotated Q and K; SDPA also keeps its logsumexp.
        # (Selective recomputation keeps the same core-attention inputs, and rebuilds the rest.)
        attention += 2 * (q + 2 * kv) / tp + 2 * q / tp + 2 * kv / tp + (4 * heads / tp if fast else 0)
    else:
        # Q, K and V as [b * heads, s, d] (K and V repeated to all heads for grouped queries;
        # without groups V stays a view of the QKV output) and the probabilities twice: the
        # fp32 softmax output and its bf16 copy.
        v = 2 * q / tp if kv < q else 2 * (q + 2 * kv) / tp
        attention += 2 * q / tp + 2 * q / tp + v + 6 * heads * s / tp
    if moe_layer:
        f = moe.ffn_hidden_size or llm.ffn_hidden_size
        etp = p.expert_tensor_parallel_size or tp
        e, k = moe.num_experts, moe.router_topk
        router = (13 * e + 28 * k + 4) / sp  # fp32 logits, probabilities, routing map, indices
        # Each token goes to k experts: its copy of the input, its fp32 weight, then per expert
        # the FC1 output and the SwiGLU output (FC2's input); eager SwiGLU keeps three more.
        # The dispatcher gathers the sequence that SP split over TP back over the expert-TP
        # group, so this rank's experts see k * etp / sp copies per token on average.
        per_copy = 2 * h + 4 + (6 * f if fast else 12 * f) / etp
        mlp = 2 * h / sp + router + k * etp / sp * per_copy
    else:
        f = llm.ffn_hidden_size
        # FC1's input and output and the SwiGLU output; eager SwiGLU keeps two more.
        mlp = 2 * h / sp + (6 * f if fast else 10 * f) / tp
    return {"input_layernorm": norm, "self_attention": attention, "pre_mlp_layernorm": norm, "mlp": mlp}


def mask_bytes(cfg: Config) -> float:
    """Bytes per token of the attention mask all layers share: megatron's boolean [s, s], or the
    fast spec's additive bf16 one."""
    return (2 if cfg.model.layer_spec == "fast" else 1) * cfg.data.seq_length


def vision_layer_activation_bytes(cfg: Config) -> dict[str, float]:
    """Bytes one ViT layer keeps for backward per token (patch or class token) of an image, as above."""
    v, tp = cfg.model.vision, cfg.parallel.tensor_model_parallel_size
    w, heads, tokens = v.hidden_size, v.num_attention_heads, v.sequence_length
    norm = 2 * w + 8  # LayerNorm: input, fp32 mean and 1/std
    # The QKV input and output (Q, K, V are views of it), the output projection's input; SDPA's
    # logsumexp or the local spec's fp32 and bf16 probabilities.
    attention = 2 * w + 6 * w / tp + 2 * w / tp
    attention += 4 * heads / tp if cfg.model.layer_spec == "fast" else 6 * heads * tokens / tp
    mlp = 2 * w + 4 * v.ffn_hidden_size / tp  # FC1's input, QuickGELU's input (compiled) and output
    return {"input_layernorm": norm, "self_attention": attention, "pre_mlp_layernorm": norm, "mlp": mlp}


def connector_activation_bytes(cfg: Config, images: int) -> float:
    """About what the connector keeps for backward: twelve bf16 feature maps per RegNet
    bottleneck (convs, norms, activations, squeeze-excitation); within 20% of real ones."""
    v, c = cfg.model.vision, cfg.model.connector
    return 2.0 * images * 12 * c.depth * c.hidden_size * (v.num_patches + c.num_image_tokens)


def _vision_activation_bytes(cfg: Config, images: int) -> float:
    """Bytes the vision encoder and connector keep for backward for `images` images."""
    v = cfg.model.vision
    tokens = images * v.sequence_length
    encoder = tokens * v.num_layers_used * sum(vision_layer_activation_bytes(cfg).values())
    return encoder + connector_activation_bytes(cfg, images)


def memory_per_gpu(cfg: Config, layout: Layout, images_per_sequence: int) -> dict[str, float]:
    """GiB on the most loaded rank (the pipeline stage with the largest sum), by category;
    the optimizer state is sharded over DP under training.distributed_optimizer.

    weights + gradients + optimizer + activations is what the caching allocator hands out
    (torch.cuda.max_memory_allocated); `reserved` (RESERVED_GIB: CUDA context, NCCL buffers,
    fragmentation) is outside it; total = those five; `stage` is the pipeline stage."""
    cfg = apply_layout(cfg, layout)
    distributed_optimizer = cfg.training.distributed_optimizer
    llm, moe = cfg.model.llm, cfg.model.moe
    bf16 = cfg.training.bf16
    weight_bytes = 2 if bf16 else 4
    optim_bytes = 12 if bf16 else 8  # Adam moments, plus fp32 master weights under bf16
    expert_dp = layout.dp * layout.tp // (layout.ep * layout.etp)
    micro_batches = cfg.training.global_batch_size // (layout.micro_batch * layout.dp)
    tokens = layout.micro_batch * cfg.data.seq_length
    vpp = layout.vpp or 1
    worst: dict[str, float] = {}
    for stage in range(layout.pp):
        params = rank_parameters(cfg, stage)
        optimizer = optim_bytes * (
            params["dense"] / layout.dp + params["expert"] / expert_dp if distributed_optimizer else params["total"]
        )
        layers = [i for v in range(vpp) for i in _chunk_layers(cfg, stage, v)]
        per_mb = [
            sum(layer_activation_bytes(cfg, moe.num_experts > 0 and i % moe.layer_freq == 0).values())
            for i in layers
        ]
        if layout.recompute == "full":
            # Only each layer's input is kept; one layer's activations are rebuilt at a time.
            sp = layout.tp if layout.sequence_parallel else 1  # SP splits the inputs over TP
            kept = 2.0 * llm.hidden_size / sp * len(layers) + max(per_mb)
        else:
            kept = sum(per_mb)
        # 1F1B keeps pp - stage micro-batches in flight; the interleaved schedule's warm-up
        # holds (pp - stage - 1) * 2 + (vpp - 1) * pp + 1 chunks, each 1/vpp of the stage.
        in_flight = layout.pp - stage if vpp == 1 else ((layout.pp - stage - 1) * 2 + (vpp - 1) * layout.pp + 1) / vpp
        in_flight = min(in_flight, micro_batches)
        activations = tokens * (kept + mask_bytes(cfg)) * in_flight
        if stage == 0:
            images = layout.micro_batch * images_per_sequence
            activations += _vision_activation_bytes(cfg, images) * min(layout.pp, micro_batches)
        if stage == layout.pp - 1:
            # bf16 logits, their fp32 copy, and the cross-entropy's fp32 softmax; one micro-batch.
            activations += tokens * llm.vocab_size / layout.tp * 10
        row = {
            "weights": weight_bytes * params["total"] / GIB,
            "gradients": 4 * params["total"] / GIB,  # fp32 main_grad buffers
            "optimizer": optimizer / GIB,
            "activations": activations / GIB,
            "reserved": RESERVED_GIB,
        }
        row["total"] = sum(row.values())
        row["stage"] = stage
        if not worst or row["total"] > worst["total"]:
            worst = row
    return worst


# ----------------------------------------------------------------------------- throughput


def relative_step_time(cfg: Config, layout: Layout, images_per_sequence: int) -> float:
    """A step's time in units of (FLOPs / GPU efficiency), for ranking layouts of one GPU count.

    The slowest pipeline stage sets the pace (stage 0 also runs the vision side, the last the
    output layer); 1F1B adds (pp - 1) / vpp micro-batches of bubble; TP, EP and micro-batch
    size scale efficiency; full recomputation re-runs each LLM layer's forward."""
    from megatron_mm1 import flops  # imports torch: the command parsers import this module for GPUS

    cfg = apply_layout(cfg, layout)
    llm, moe, s = cfg.model.llm, cfg.model.moe, cfg.data.seq_length
    mult = flops.backward_multipliers(cfg)
    # One sequence: images_per_sequence images, the rest text, as one causal sample.
    fwd = flops.forward_flops(cfg, [s], images_per_sequence)
    layer_fwd = (fwd["llm_linear"] + fwd["llm_attention"]) / llm.num_layers
    dense_extra = moe_extra = 0.0
    if moe.num_experts:
        f_moe = moe.ffn_hidden_size or llm.ffn_hidden_size
        h = llm.hidden_size
        moe_layers = len(range(0, llm.num_layers, moe.layer_freq))
        # Spread evenly above; put the MoE FFN difference back on the layers that have it.
        diff = 2.0 * s * (h * moe.num_experts + moe.router_topk * 3 * h * f_moe - 3 * h * llm.ffn_hidden_size)
        moe_extra = diff - diff * moe_layers / llm.num_layers
        dense_extra = -diff * moe_layers / llm.num_layers
    # Full recomputation re-runs each layer's forward; selective only its attention core.
    recompute = {"none": 0.0, "selective": fwd["llm_attention"] / llm.num_layers, "full": layer_fwd}[layout.recompute]
    stage_time = []
    vpp = layout.vpp or 1
    for stage in range(layout.pp):
        layers = [i for v in range(vpp) for i in _chunk_layers(cfg, stage, v)]
        work = sum(
            3 * (layer_fwd + (moe_extra if moe.num_experts and i % moe.layer_freq == 0 else dense_extra)) + recompute
            for i in layers
        )
        if stage == 0:
            work += sum(fwd[k] * mult[k] for k in ("patch_embed", "vision", "connector"))
        if stage == layout.pp - 1:
            work += fwd["logits"] * mult["logits"]
        stage_time.append(work)
    efficiency = TP_EFFICIENCY[layout.tp] * MICRO_BATCH_EFFICIENCY[layout.micro_batch]
    if layout.ep > 1:
        efficiency *= 1 - 0.03 * math.log2(layout.ep)  # token all-to-all
    if layout.vpp:
        efficiency *= 0.98  # more pipeline sends
    micro_batches = cfg.training.global_batch_size // (layout.micro_batch * layout.dp)
    per_micro_batch = max(stage_time) * layout.micro_batch / (layout.tp * efficiency)
    return per_micro_batch * (micro_batches + (layout.pp - 1) / vpp)


# ----------------------------------------------------------------------------- enumeration


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, gpus: int) -> list[Layout]:
    llm, moe = cfg.model.llm, cfg.model.moe
    out = []
    # selective recomputation only pays where attention keeps its [s, s] probabilities.
    recomputes = ["none", "selective", "full"] if cfg.model.layer_spec == "local" else ["none", "full"]
    for tp, pp in itertools.product([t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE], _divisors(llm.num_layers)):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        for vpp in [None] + ([2, 4] if pp > 1 else []):
            eps = [e for e in _divisors(moe.num_experts) if e <= gpus] if moe.num_experts else [1]
            for ep, etp in itertools.product(eps, sorted({1, tp}) if moe.num_experts else [tp]):
                for mbs, rec in itertools.product([1, 2, 4], recomputes):
                    out.append(Layout(tp, pp, vpp, ep, etp if ep > 1 else tp, dp, mbs, rec, tp > 1))
    return list(dict.fromkeys(out))


def _validation_reason(error: ConfigError) -> str:
    """config.validate's problems on one line."""
    return str(error).split("\n  - ", 1)[-1].replace("\n  - ", "; ")


def _memory_gib(cfg: Config, layout: Layout, images: int) -> dict[str, float]:
    return {k: round(v, 2) for k, v in memory_per_gpu(cfg, layout, images).items()}


def _too_big(mem: dict[str, float], gpu: GPU) -> tuple[str, str]:
    """(reason, kind) for a layout needing `mem` that does not fit `gpu`."""
    largest = max(("weights", "gradients", "optimizer", "activations"), key=mem.get)
    return (
        f"needs {mem['total']:.1f} GiB on pipeline stage {mem['stage']} > {gpu.memory_gib} GiB "
        f"of a {gpu.name} (largest: {largest} {mem[largest]:.1f} GiB)",
        f"does not fit in {gpu.memory_gib} GiB (largest part: {largest})",
    )


def evaluate_config_layout(cfg: Config, world_size: int, gpu: GPU, images_per_sequence: Optional[int] = None) -> dict:
    """The config's own layout (after any overrides) on `world_size` GPUs, exactly as configured:
    its TP, PP, VPP, EP, ETP, sequence parallelism, micro-batch, training.recompute_llm, layer
    spec and optimizer sharding, with DP = world_size / (TP x PP).

    {"fits": bool, "layout": Layout as a dict (as in plan()'s "fits"), "name": str,
     "memory_gib": memory_per_gpu() rounded to 0.01, "reason": why it does not fit, or None}.
    When config.validate refuses the config at this world size, `fits` is false, `reason` is
    the validation message and `memory_gib` is None (and `dp` and `name` too when TP x PP does
    not divide the world size). training.recompute_vision is not modelled (estimated as none)."""
    images = cfg.model.max_images_per_sequence if images_per_sequence is None else images_per_sequence
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    divisible = tp * pp >= 1 and world_size % (tp * pp) == 0
    layout = Layout(tp, pp, p.virtual_pipeline_model_parallel_size, p.expert_model_parallel_size,
                    p.expert_tensor_parallel_size or tp, world_size // (tp * pp) if divisible else 0,
                    t.micro_batch_size, t.recompute_llm, p.sequence_parallel)
    result = {"fits": False, "layout": dataclasses.asdict(layout), "name": layout.name(), "memory_gib": None, "reason": None}
    try:
        validate(cfg, world_size=world_size)
    except ConfigError as e:
        if not divisible:
            result["layout"]["dp"] = result["name"] = None
        return {**result, "reason": _validation_reason(e)}
    mem = _memory_gib(cfg, layout, images)
    fits = mem["total"] <= gpu.memory_gib
    return {**result, "fits": fits, "memory_gib": mem, "reason": None if fits else _too_big(mem, gpu)[0]}


def plan(cfg: Config, gpus: int, gpu: GPU, images_per_sequence: Optional[int] = None) -> dict:
    """{'fits': ranked [{layout, memory, relative_throughput, ...}], 'rejected': [{layout, reason}],
    'preset_layout': the config's own layout (evaluate_config_layout)}."""
    images = cfg.model.max_images_per_sequence if images_per_sequence is None else images_per_sequence
    fits, rejected = [], []
    for layout in candidate_layouts(cfg, gpus):
        entry = {"layout": dataclasses.asdict(layout), "name": layout.name()}
        try:
            validate(apply_layout(cfg, layout), world_size=gpus)
        except ConfigError as e:
            reason = _validation_reason(e)
            rejected.append({**entry, "reason": reason, "kind": reason})
            continue
        entry["memory_gib"] = mem = _memory_gib(cfg, layout, images)
        if mem["total"] > gpu.memory_gib:
            reason, kind = _too_big(mem, gpu)
            rejected.append({**entry, "reason": reason, "kind": kind})
            continue
        entry["step_time"] = relative_step_time(cfg, layout, images)
        entry["overrides"] = layout.overrides()
        fits.append(entry)
    best = min((f["step_time"] for f in fits), default=1.0)
    for f in fits:
        f["relative_throughput"] = round(best / f.pop("step_time"), 3)
    fits.sort(key=lambda f: (-f["relative_throughput"], f["memory_gib"]["total"]))
    return {
        "gpus": gpus,
        "gpu": dataclasses.asdict(gpu),
        "images_per_sequence": images,
        "distributed_optimizer": cfg.training.distributed_optimizer,
        "preset_layout": evaluate_config_layout(cfg, gpus, gpu, images),
        "fits": fits,
        "rejected": rejected,
    }


def fit_warning(cfg: Config, world_size: int, gpu: GPU, preset: dict) -> str:
    """`WARNING:` lines for a config whose own layout does not fit (`preset`, from
    evaluate_config_layout), with the overrides of the planner's best layout that does. The
    ranking runs only here: it takes seconds for MoE models."""
    lines = [f"WARNING: layout {preset['name']} is estimated not to fit {world_size} x {gpu.name}: {preset['reason']}"]
    fits = plan(cfg, world_size, gpu)["fits"]
    if fits:
        lines.append(f"WARNING: the planner's best layout that fits ({fits[0]['name']}, {fits[0]['memory_gib']['total']:.1f} GiB; "
                     f"`mm1 plan` ranks the others): {' '.join('--set ' + o for o in fits[0]['overrides'])}")
    else:
        lines.append(f"WARNING: no layout of this model fits {world_size} x {gpu.name}; use more GPUs (`mm1 plan`)")
    return "\n".join(lines)
