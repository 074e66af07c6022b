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
import itertools
import math
from dataclasses import dataclass
from typing import Optional

from megatron_mm1 import arithmetic, flops
from megatron_mm1.config import Config, ConfigError, validate

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what the device reports as usable
    peak_tflops: Optional[float]  # bf16 dense; None for a device not in GPUS
    family: str  # what the name torch.cuda reports contains ("NVIDIA H100 80GB HBM3": H100)


# The one table of devices: the planner's memory, and the peak that the benchmark's and
# training's MFU divide by.
GPUS = {
    "h100-80gb": GPU("H100 SXM 80GB", 79.6, 989.0, "H100"),
    "h200-141gb": GPU("H200 141GB", 139.8, 989.0, "H200"),
    "a100-80gb": GPU("A100 SXM 80GB", 79.2, 312.0, "A100"),
    "a100-40gb": GPU("A100 SXM 40GB", 39.4, 312.0, "A100"),
}
GPUS_PER_NODE = 8
RESERVED_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
# Compute efficiency relative to TP1 (per-layer collectives on NVLink); TP stays inside a node.
TP_EFFICIENCY = {1: 1.0, 2: 0.93, 4: 0.87, 8: 0.80}
MICRO_BATCH_EFFICIENCY = {1: 1.0, 2: 1.03, 4: 1.05}  # larger GEMMs run a little closer to peak


def gpu_type(device_name: str, memory_gib: Optional[float] = None) -> Optional[str]:
    """The GPUS key of a device by the name torch.cuda reports; of its family, the one nearest
    in memory when `memory_gib` is given (an A100's 40 or 80 GB). None for another device."""
    keys = [key for key, gpu in GPUS.items() if gpu.family in device_name]
    if memory_gib is not None:
        keys.sort(key=lambda key: abs(GPUS[key].memory_gib - memory_gib))
    return keys[0] if keys else None


def measured_gpu(name: str, total_bytes: int) -> GPU:
    """The GPU a process sees (torch.cuda.get_device_properties' name and total_memory): its
    type's entry of GPUS with this name and memory (the memory decides what fits)."""
    memory = round(total_bytes / GIB, 1)
    key = gpu_type(name, memory)
    return dataclasses.replace(GPUS[key], name=name, memory_gib=memory) if key else GPU(name, memory, None, "")


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
    p = cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    dense = expert = 0
    for vp_stage in range(p.virtual_pipeline_model_parallel_size or 1):
        for i in _chunk_layers(cfg, pp_rank, vp_stage):
            moe_layer = arithmetic.is_moe_layer(cfg, i)
            dense += arithmetic.layer_parameters(cfg, moe_layer, tp)
            if moe_layer:
                expert += cfg.model.moe.num_experts // ep * arithmetic.expert_parameters(cfg, etp)
    if pp_rank == 0:  # first chunk: embeddings and the vision side
        dense += arithmetic.embedding_parameters(cfg, tp) + arithmetic.vision_parameters(cfg, tp)
        dense += arithmetic.connector_parameters(cfg)
    if pp_rank == pp - 1:  # last chunk: final norm and output layer (a tied one is the embedding)
        tied = cfg.model.llm.tie_embeddings and pp == 1
        dense += arithmetic.final_norm_parameters(cfg) + (0 if tied else arithmetic.embedding_parameters(cfg, tp))
    return {"dense": dense, "expert": expert, "total": dense + expert}


# ----------------------------------------------------------------------------- memory


def _vision_activation_bytes(cfg: Config, images: int) -> float:
    """Bytes the vision encoder and connector keep for backward for `images` images."""
    v = cfg.model.vision
    tokens = images * v.sequence_length
    encoder = tokens * v.num_layers_used * sum(arithmetic.vision_layer_activation_bytes(cfg).values())
    return encoder + arithmetic.connector_activation_bytes(cfg, images)


def memory_per_gpu(cfg: Config, layout: Layout, images_per_sequence: int) -> dict[str, float]:
    """GiB on the most loaded rank (the pipeline stage with the largest sum), by category;
    the optimizer state is sharded over DP under training.distributed_optimizer.

    weights + gradients + optimizer + activations is what the caching allocator hands out
    (torch.cuda.max_memory_allocated); `reserved` (RESERVED_GIB: CUDA context, NCCL buffers,
    fragmentation) is outside it; total = those five; `stage` is the pipeline stage."""
    cfg = apply_layout(cfg, layout)
    distributed_optimizer = cfg.training.distributed_optimizer
    llm = cfg.model.llm
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
        per_mb = [sum(arithmetic.layer_activation_bytes(cfg, arithmetic.is_moe_layer(cfg, i)).values()) for i in layers]
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
        activations = tokens * (kept + arithmetic.mask_bytes(cfg)) * in_flight
        if stage == 0:
            images = layout.micro_batch * images_per_sequence
            activations += _vision_activation_bytes(cfg, images) * min(layout.pp, micro_batches)
        if stage == layout.pp - 1:
            # bf16 logits, their fp32 copy, and the cross-entropy's fp32 softmax; one micro-batch.
            activations += tokens * llm.padded_vocab_size / layout.tp * 10
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
    cfg = apply_layout(cfg, layout)
    s = cfg.data.seq_length
    mult = flops.backward_multipliers(cfg)
    # One sequence: images_per_sequence images, the rest text, as one sample, its attention as
    # the layer spec's kernel computes it.
    pairs = arithmetic.kernel_pairs(cfg, [s])
    fwd = flops.forward_flops(cfg, s, pairs, images_per_sequence)
    core = fwd["llm_attention"] / cfg.model.llm.num_layers  # one layer's attention core, forward

    def layer_work(moe_layer: bool) -> float:
        linear = 2.0 * s * arithmetic.layer_macs(cfg, moe_layer)
        # Full recomputation re-runs the layer's forward; selective only its attention core.
        recompute = {"none": 0.0, "selective": core, "full": linear + core}[layout.recompute]
        return linear * mult["llm_linear"] + core * mult["llm_attention"] + recompute

    stage_time = []
    vpp = layout.vpp or 1
    for stage in range(layout.pp):
        layers = [i for v in range(vpp) for i in _chunk_layers(cfg, stage, v)]
        work = sum(layer_work(arithmetic.is_moe_layer(cfg, i)) for i in layers)
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
    recomputes = ["none", "selective", "full"] if arithmetic.kernels(cfg).keeps_probabilities else ["none", "full"]
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
