"""MoE experts as grouped GEMMs (the `fast` spec): all of this rank's local experts in one
`torch._grouped_mm` per linear, where megatron's SequentialMLP (the `local` spec) runs one expert
MLP after another. A drop-in for SequentialMLP in megatron's MoELayer: same constructor and
forward contract, same results, same checkpoint.

Weights are stacked, one parameter per linear: `weight1` [experts, fc1 rows, hidden] and
`weight2` [experts, hidden, ffn]. Slice e is exactly SequentialMLP's
`local_experts.e.linear_fc1.weight` / `linear_fc2.weight` on this rank (same expert-TP split,
SwiGLU's [gate; up] halves, same initialisation in the same RNG order), so
- the GEMMs read the parameters in place: stacking per-expert weights every step would copy them
  all, and autograd would keep the copy until backward;
- the sharded state dict stores each slice under SequentialMLP's checkpoint key and offsets, so
  `local` and `fast` checkpoints load into each other (weights, and optimizer state saved per
  parameter), at any layout;
- expert tensor parallelism needs no communication here, as in SequentialMLP (megatron's
  "explicit expert comm"): the token dispatcher gathers the tokens over the expert-TP group
  before the experts and reduce-scatters fc2's partial sums after them.

torch._grouped_mm runs CUTLASS's grouped kernel for bf16 on Hopper/Blackwell and its own
per-group loop elsewhere (CPU, other GPUs or dtypes), with the same results. It needs rows of
a multiple of 16 bytes, which config validation checks before anything starts.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.utils import divide
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

# SequentialMLP's names for a stacked weight's slices, and the axis expert TP splits.
LINEARS = {"weight1": ("linear_fc1", 0), "weight2": ("linear_fc2", 1)}


class TorchGroupedMLP(MegatronModule):
    """Every local expert's SwiGLU MLP in two grouped GEMMs. Constructed as MoELayer constructs
    SequentialMLP; `submodules` (SequentialMLP's linears) is accepted and unused."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: Optional[MLPSubmodules] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "biases on the experts' linears (add_bias_linear)": config.add_bias_linear,
            "fp8/fp4": config.fp8 or config.fp4,
            "moe_latent_size": config.moe_latent_size is not None,
            "the moe_act recompute module": config.recompute_granularity == "selective"
            and "moe_act" in (config.recompute_modules or []),
            "bias_activation_fusion without SwiGLU": config.bias_activation_fusion
            and not (config.gated_linear_unit and config.activation_func is F.silu),
        }
        refused = [name for name, used in unsupported.items() if used]
        if refused:
            raise ValueError(f"the grouped-GEMM experts do not support {', '.join(refused)}; use model.layer_spec=local")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        glu = 2 if config.gated_linear_unit else 1
        ffn_local = divide(ffn, tp_size)
        # Where megatron's linears allocate: the current device, or the default one (CPU, meta).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        empty = lambda *shape: torch.empty(num_local_experts, *shape, device=device, dtype=config.params_dtype)
        self.weight1 = torch.nn.Parameter(empty(glu * ffn_local, hidden))
        self.weight2 = torch.nn.Parameter(empty(hidden, ffn_local))
        if config.perform_initialization:
            for e in range(num_local_experts):  # SequentialMLP's order: expert e's fc1, then its fc2
                self._init(self.weight1[e], config.init_method, glu * ffn, hidden, 0, glu, tp_rank, tp_size)
                self._init(self.weight2[e], config.output_layer_init_method, hidden, ffn, 1, 1, tp_rank, tp_size)
        for weight, dim, stride in ((self.weight1, 1, glu), (self.weight2, 2, 1)):
            set_tensor_model_parallel_attributes(weight, True, dim, stride)
            # Gradients of expert-parallel weights are reduced over the expert-data-parallel group.
            weight.allreduce = config.expert_model_parallel_size == 1

    def _init(self, w, init_method, rows: int, cols: int, tp_dim: int, stride: int, rank: int, size: int) -> None:
        """Initialise expert slice `w` as megatron's Column/RowParallelLinear initialise theirs."""
        if self.config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                w, rows, cols, w.shape[tp_dim], tp_dim, init_method, stride, rank=rank, world_size=size,
                skip_set_tensor_parallel_attributes=True,
            )
        else:
            _initialize_affine_weight_gpu(w, init_method, tp_dim, stride, is_expert=True)

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """[tokens, hidden] grouped by expert (`tokens_per_expert` rows each) -> the experts'
        outputs scaled by the router's probabilities (fc2 partial sums under expert TP)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x, probs = (probs.unsqueeze(-1) * x).to(x.dtype), torch.ones_like(probs)
        if x.shape[0] == 0:
            # No tokens here: grouped_mm's backward refuses an empty gradient's strides. Both
            # weights still need their (zero) gradients and x its backward, which other ranks'
            # token exchange waits for.
            h = self._activation(x @ self.weight1[0].t(), probs)
            return h @ self.weight2[0].t(), None
        # int32 cumulative ends, on x's device (dispatchers may count on the CPU).
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0, dtype=torch.int32)
        w1, w2 = self.weight1, self.weight2
        # An expert without tokens must get a zero gradient; CUDA's grouped kernel has given such
        # experts garbage on Blackwell (pytorch/pytorch#172439). Megatron's dropless dispatchers
        # count on the CPU: there the check is free and the fill runs only when an expert idles.
        idle = tokens_per_expert == 0
        if torch.is_grad_enabled() and (idle.device.type != "cpu" or idle.any()):
            w1, w2 = _zero_grad_where(w1, idle), _zero_grad_where(w2, idle)
        h = self._activation(self._grouped_mm(x, w1, offs), probs)
        return self._grouped_mm(h, w2, offs), None

    @staticmethod
    def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] times each expert's weight[e].T [in, out] on its rows."""
        w = weight.transpose(1, 2)  # a view: each expert column-major, as the kernels take it
        y = torch._grouped_mm(x, w, offs=offs)
        if y.requires_grad:  # its backward refuses a broadcast gradient (strides 0, as .sum() gives)
            y.register_hook(torch.Tensor.contiguous)
        return y

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The activation times the router probabilities, as megatron's MLP applies them for
        SequentialMLP (its `per_token_scale`): fused SwiGLU or eager, cast back to h's dtype."""
        c, probs = self.config, probs.unsqueeze(-1)
        if c.bias_activation_fusion:
            return weighted_bias_swiglu_impl(h, None, probs, c.activation_func_fp8_input_store)
        if c.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            if c.activation_func_clamp_value is not None:
                gate = gate.clamp(max=c.activation_func_clamp_value)
                up = up.clamp(-c.activation_func_clamp_value, c.activation_func_clamp_value)
            out = c.activation_func(gate) * (up + c.glu_linear_offset)
        else:
            out = c.activation_func(h)
        return (out * probs).to(out.dtype)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Each stacked weight as SequentialMLP's per-expert tensors (the same checkpoint keys,
        offsets and replica ids), through one factory per parameter: megatron's optimizers find
        a parameter's checkpoint entry by the entry's data being that parameter."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        first = self.ep_group.rank() * self.num_local_experts
        total = self.ep_group.size() * self.num_local_experts

        def expert_offsets(e: int) -> tuple:
            return sharded_offsets if singleton else (*sharded_offsets, (len(sharded_offsets), first + e, total))

        def expert_key(key: str, e: int) -> str:
            return key.replace(f"{prefix}experts.", f"{prefix}experts.{first + e}.") if singleton else key

        def swiglu_fc1(weight_name: str) -> bool:
            return weight_name == "weight1" and self.config.gated_linear_unit

        def build(weight_name: str, key: str, stacked: torch.Tensor, replica_id, flattened_range) -> list:
            assert flattened_range is None, "flattened (fully sharded) optimizer states are not supported"
            pieces = []
            for e in range(self.num_local_experts):
                piece = make_tp_sharded_tensor_for_checkpoint(
                    stacked[e], expert_key(key, e), LINEARS[weight_name][1], replica_id=replica_id,
                    prepend_offsets=expert_offsets(e), tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
                )
                if swiglu_fc1(weight_name):  # [gate; up] saved as two halves, as megatron's MLP saves them
                    piece = apply_swiglu_sharded_factory(piece, expert_offsets(e), singleton).build()
                pieces.append(piece)
            return pieces

        def merge(weight_name: str, pieces: list) -> torch.Tensor:
            return torch.stack([torch.cat(p) if swiglu_fc1(weight_name) else p for p in pieces])

        # SequentialMLP's replica ids: (pipeline, expert-TP, expert-data-parallel rank).
        replica_id = (0, 0, self.dp_group.rank())
        state = {}
        for weight_name, (linear, _) in LINEARS.items():
            state[f"{prefix}{weight_name}"] = ShardedTensorFactory(
                f"{prefix}experts.{linear}.weight",
                getattr(self, weight_name),
                lambda *args, name=weight_name: build(name, *args),
                lambda pieces, name=weight_name: merge(name, pieces),
                replica_id,
            )
        return state

    def backward_dw(self) -> None:
        """Weight gradients are computed in backward (SequentialMLP's API for delayed wgrad)."""


def _zero_grad_where(weight: torch.Tensor, idle: torch.Tensor) -> torch.Tensor:
    """`weight` whose gradient is zero for the experts marked `idle`. The hook is on a view in
    the parameter's own layout: a fill of the transposed view's gradient would cost two strided
    copies of every expert weight."""
    if not weight.requires_grad:
        return weight
    view = weight.view_as(weight)
    view.register_hook(lambda grad: grad.masked_fill(idle.to(grad.device).view(-1, 1, 1), 0))
    return view


def as_sequential(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Named tensors (a state dict, gradients) with each TorchGroupedMLP's stacked weights split
    into SequentialMLP's per-expert names (`experts.local_experts.{e}.linear_fc1.weight`...),
    which is how the `local` spec names the same tensors."""
    out = {}
    for name, tensor in named.items():
        module, _, leaf = name.rpartition(".")
        if leaf in LINEARS and (module in ("", "experts") or module.endswith(".experts")):
            prefix = f"{module}." if module else ""
            for e, expert in enumerate(tensor):
                out[f"{prefix}local_experts.{e}.{LINEARS[leaf][0]}.weight"] = expert
        else:
            out[name] = tensor
    return out


# Which module computes a MoE layer's experts, by layer spec.
EXPERTS = {"local": SequentialMLP, "fast": TorchGroupedMLP}
