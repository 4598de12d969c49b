"""GriffinMLP: one feed-forward module for every supported architecture.

It adopts the original MLP's linear layers under their original names (so
weights, LoRA names and ``reload_weights`` see the same parameters) and runs,
per step, three groups of tokens:

* prompt tokens -- the full MLP, exactly as vLLM would; their activations
  feed the statistic (only those not yet counted);
* generated tokens -- only their request's experts, by the path ops.dispatch
  picks for the step (expert kernels, or vLLM's GEMMs with per-row masks);
* everything when no request needs GRIFFIN this step -- the original forward,
  bit for bit.

The forward body is a registered custom op, so ``torch.compile`` traces one
opaque call per layer and the per-step Python logic runs eagerly inside it
(uncompiled, the forward calls the body directly).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import reduce

import torch
from torch import nn

from vllm_griffin import ops
from vllm_griffin.core import algorithm
from vllm_griffin.core.architectures import ArchSpec
from vllm_griffin.core.state import GriffinState, StepPlan
from vllm_griffin.engine import graph_decode

_LAYERS: dict[str, GriffinMLP] = {}
_ACTIVE_PLAN: StepPlan | None = None
_OP_REGISTERED = False


def set_active_plan(plan: StepPlan | None) -> None:
    """Make ``plan`` the one every GriffinMLP reads until the next call (Model Runner V2,
    whose model state plans a step before the runner calls the model)."""
    global _ACTIVE_PLAN
    _ACTIVE_PLAN = plan


@contextmanager
def active_plan(plan: StepPlan | None) -> Iterator[None]:
    """Make ``plan`` the one every GriffinMLP reads during a forward pass."""
    global _ACTIVE_PLAN
    previous, _ACTIVE_PLAN = _ACTIVE_PLAN, plan
    try:
        yield
    finally:
        _ACTIVE_PLAN = previous


class GriffinMLP(nn.Module):
    """``host`` is the architecture's MLP module (which this replaces) or, for an
    inline feed-forward block (OPT), the decoder layer itself (see :func:`install`)."""

    def __init__(self, host: nn.Module, spec: ArchSpec, layer_index: int, layer_name: str, state: GriffinState):
        super().__init__()
        self.spec = spec
        self.layer_index = layer_index
        self.layer_name = layer_name
        self.state = state
        gate_up, down, act = (getattr(host, attr) for attr in (spec.gate_up, spec.down, spec.act))
        # A plain tuple, so the modules are not registered a second time under this one.
        self._modules_used = (gate_up, down, act)
        if spec.mlp is not None:
            # Adopt the MLP's modules under their own names: checkpoints, LoRA names
            # and ``reload_weights`` see the same parameters.
            for attr, module in zip((spec.gate_up, spec.down, spec.act), self._modules_used):
                setattr(self, attr, module)
            self._gate_up_fn, self._down_fn, self._act_fn = gate_up, down, act
            # The untouched forward: used whenever no token needs GRIFFIN.
            self.dense_forward = host.forward
        else:
            # The modules stay in the decoder layer, whose own calls install()
            # reroutes; here they run through their classes' forwards.
            self._gate_up_fn, self._down_fn, self._act_fn = (_class_forward(m) for m in (gate_up, down, act))
            self.dense_forward = self._inline_dense_forward
        self.activation = activation_name(act) if spec.gated else None
        # Gather-friendly copy of the weights (ops.ExpertWeights), built when vLLM
        # post-processes the loaded weights (on CPU it then repacks them for
        # oneDNN and drops the plain ones, so this is the only plain copy).
        self.expert_weights: ops.ExpertWeights | None = None
        self._kernel_ok: bool | None = None  # whether an expert kernel runs them (asked once)
        # The masked path's activation, per (dtype, gated).
        self._masked_fns: dict[tuple[torch.dtype, bool], object] = {}
        self._gate_up_loaded: tuple[torch.Tensor, torch.Tensor | None] | None = None
        _on_weights_processed(gate_up, self._keep_gate_up)
        _on_weights_processed(down, self._keep_down)
        _LAYERS[layer_name] = self

    @property
    def gate_up(self) -> nn.Module:
        return self._modules_used[0]

    @property
    def down(self) -> nn.Module:
        return self._modules_used[1]

    @property
    def act(self) -> nn.Module:
        return self._modules_used[2]

    def _inline_dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self._gate_up_fn(x)
        out, _ = self._down_fn(self._act_fn(h))
        return out

    def _keep_gate_up(self, linear: nn.Module) -> None:
        weight, bias = linear.weight.detach(), _bias_of(linear)
        self._gate_up_loaded = (weight, bias)
        if self.spec.gated:
            width = weight.shape[0] // 2
            scores = algorithm.magnitude_scores(weight[:width], weight[width:])
        else:
            scores = algorithm.magnitude_scores(weight, None)
        self.state.static_scores[self.layer_index] = scores

    def _keep_down(self, linear: nn.Module) -> None:
        # vLLM processes gate_up before down (module order), so both are here now.
        (w_gate_up, b_gate_up), weight = self._gate_up_loaded, linear.weight.detach()
        self.state.down_norms_sq[self.layer_index] = algorithm.down_norms(weight).square()
        # A row-parallel linear adds its bias once, on rank 0, before the all-reduce.
        b_down = _bias_of(linear) if getattr(linear, "tp_rank", 0) == 0 else None
        if not self.spec.gated:
            weights = ops.ExpertWeights.ungated(w_gate_up, weight, b_gate_up, b_down)
        elif weight.device.type == "cpu":
            # One [D, 3, H] block: a neuron's three rows are adjacent (one stream).
            weights = ops.ExpertWeights.interleaved(w_gate_up, weight, b_gate_up, b_down)
        else:
            # GPUs keep vLLM's gate_up rows as they are; only down is transposed.
            weights = ops.ExpertWeights.separate(w_gate_up, weight.t().contiguous(), b_gate_up, b_down)
        self.expert_weights = weights
        self._kernel_ok = None
        self._gate_up_loaded = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.vllm.griffin_mlp(x, self.layer_name)
        return self.run(x)  # eager: the same call without the op dispatcher's cost

    def run(self, x: torch.Tensor) -> torch.Tensor:
        graph = self.state.graph
        if graph is not None and graph_decode.in_full_graph():
            # Recorded into a CUDA graph: the buffered rows, nothing decided here.
            return graph.forward(self, x)
        plan = _ACTIVE_PLAN
        if plan is None or plan.all_dense:
            return self.dense_forward(x)
        state, layer = self.state, self.layer_index
        if plan.dense_idx is None:  # only prompt tokens: the full MLP, capturing on the way
            gate_up, _ = self._gate_up_fn(x)
            z = self._act_fn(gate_up)
            state.capture(layer, z, plan)
            out, _ = self._down_fn(z)
            return out
        if plan.only_sparse and x.shape[0] == plan.num_tokens:  # a pure decode step: no copies
            return self._run_experts(x, plan)
        dense_idx = _with_padding(plan, x.shape[0])
        if dense_idx.numel() and state.tp is None and self._decode_path(x.device, plan) == "masked":
            return self._one_pass(x, plan, dense_idx)
        out = torch.empty_like(x)
        if dense_idx.numel():
            gate_up, _ = self._gate_up_fn(x.index_select(0, dense_idx))
            z = self._act_fn(gate_up)
            if plan.capture_pos is not None:
                state.capture(layer, z, plan)
            dense_out, _ = self._down_fn(z)
            out.index_copy_(0, dense_idx, dense_out)
        out.index_copy_(0, plan.sparse_idx, self._run_experts(x.index_select(0, plan.sparse_idx), plan))
        return out

    def _one_pass(self, x: torch.Tensor, plan: StepPlan, dense_idx: torch.Tensor) -> torch.Tensor:
        """Dense rows (captured where the plan says) and masked sparse rows through vLLM's
        GEMMs together: the weights stream once for the step (decode_paths chose it)."""
        gate_up, _ = self._gate_up_fn(x)
        z_dense = self._act_fn(gate_up.index_select(0, dense_idx))
        if plan.capture_pos is not None:
            self.state.capture(self.layer_index, z_dense, plan)
        z_sparse = self._masked_activation(gate_up.index_select(0, plan.sparse_idx), plan)
        z = torch.empty((x.shape[0], z_dense.shape[1]), dtype=z_dense.dtype, device=z_dense.device)
        z.index_copy_(0, dense_idx, z_dense)
        z.index_copy_(0, plan.sparse_idx, z_sparse)
        out, _ = self._down_fn(z)
        return out

    def _decode_path(self, device: torch.device, plan: StepPlan) -> str:
        return self.state.decode_paths(plan, self._kernel_supported(), device)[self.layer_index][0]

    def _kernel_supported(self) -> bool:
        if self._kernel_ok is None:
            self._kernel_ok = ops.kernel_supports(self.expert_weights, self.activation)
        return self._kernel_ok

    def _masked_activation(self, gate_up: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The activation of vLLM's gate_up output, each row keeping only its request's
        experts at this layer (the others exactly 0); a `gated` row only the neurons of its
        pool whose activated gate is largest."""
        gated = plan.sparse_token_k is not None
        fn = self._masked_fns.get((gate_up.dtype, gated))
        if fn is None:
            make = ops.gated_masked_activation_fn if gated else ops.masked_activation_fn
            extra = (self.spec.gated,) if gated else ()
            fn = self._masked_fns[gate_up.dtype, gated] = make(gate_up.device, gate_up.dtype, self.activation,
                                                               self._act_fn, *extra)
        # The plan's slots come from the slot pool: always rows of the masks.
        masks = self.state.masks[self.layer_index]
        if gated:
            return fn(gate_up, masks, plan.sparse_slot, plan.sparse_token_k[self.layer_index])
        return fn(gate_up, masks, plan.sparse_slot)

    def _run_experts(self, xs: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Each decode row through its own experts, by the path the cost model picks."""
        layer = self.layer_index
        path = self._decode_path(xs.device, plan)
        if path == "masked":
            # vLLM's own GEMMs (and its tensor-parallel reduction), experts kept per row.
            gate_up, _ = self._gate_up_fn(xs)
            out, _ = self._down_fn(self._masked_activation(gate_up, plan))
            return out
        experts, counts = self.state.sparse_experts(layer, plan)
        if path in ("gated_rows", "gated_union"):
            from vllm_griffin.ops.cpu_kernel import gated_experts_cpu

            out = gated_experts_cpu(xs, self.expert_weights, experts, counts, plan.sparse_token_k[layer],
                                    self.activation, path.removeprefix("gated_"))
        elif path in ("rows", "union"):
            from vllm_griffin.ops.cpu_kernel import experts_mlp_cpu

            out = experts_mlp_cpu(xs, self.expert_weights, experts, counts, self.activation, path)
        elif path == "triton":
            from vllm_griffin.ops.triton_experts import experts_mlp_triton

            out = experts_mlp_triton(xs, self.expert_weights, experts, counts, self.activation)
        elif path == "triton_union":
            from vllm_griffin.ops.triton_experts import experts_mlp_triton_union

            out = experts_mlp_triton_union(xs, self.expert_weights, experts, counts, self.activation,
                                           masks=self.state.sparse_masks(layer, plan))
        else:
            out = ops.experts_mlp_gather(xs, self.expert_weights, experts, counts, self._act_fn).to(xs.dtype)
        return graph_decode.reduce_tp(self, out)


def activation_name(act: nn.Module) -> str | None:
    """The kernels' name for a vLLM act-and-mul module, or None (then the torch path runs)."""
    kind = type(act).__name__
    if kind == "SiluAndMul":
        return "silu"
    if kind == "GeluAndMul":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return None


def _on_weights_processed(linear: nn.Module, keep) -> None:
    """Call ``keep(linear)`` with the weights loaded, just before vLLM post-processes them."""
    method = linear.quant_method
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer: nn.Module) -> None:
        if layer is linear:
            keep(layer)
        original(layer)

    method.process_weights_after_loading = process_weights_after_loading


def _bias_of(linear: nn.Module) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    if bias is None or getattr(linear, "skip_bias_add", False):
        return None
    return bias.detach()


def _class_forward(module: nn.Module):
    """The module's forward as its class defines it (the instance's may be rerouted)."""
    return type(module).forward.__get__(module)


def _with_padding(plan: StepPlan, total: int) -> torch.Tensor:
    # Padded tokens (beyond the scheduled ones) go through the dense path.
    if total == plan.num_tokens:
        return plan.dense_idx
    pad = torch.arange(plan.num_tokens, total, device=plan.dense_idx.device)
    return torch.cat([plan.dense_idx, pad])


def _griffin_mlp(x: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _LAYERS[layer_name].run(x)


def _griffin_mlp_fake(x: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def register_op() -> None:
    global _OP_REGISTERED
    if _OP_REGISTERED or hasattr(torch.ops.vllm, "griffin_mlp"):
        _OP_REGISTERED = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("griffin_mlp", _griffin_mlp, mutates_args=[], fake_impl=_griffin_mlp_fake)
    _OP_REGISTERED = True


def decoder_layers(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return list(reduce(getattr, spec.layers.split("."), model))


def install(model: nn.Module, spec: ArchSpec, make_state) -> GriffinState:
    """Put a GriffinMLP in every decoder layer's feed-forward block, before weights load.

    ``make_state(num_layers, width, device)`` builds the shared state once the
    shapes are known. Layers this pipeline rank does not hold are skipped.
    """
    register_op()
    layers = decoder_layers(model, spec)
    owned = [(i, _ffn_host(layer, spec)) for i, layer in enumerate(layers)]
    owned = [(i, host) for i, host in owned if host is not None]
    if not owned:
        raise RuntimeError(f"GRIFFIN found no '{spec.mlp or spec.down}' modules under '{spec.layers}'")
    first = owned[0][1]
    _check_unquantized(first, spec)
    down_w = getattr(first, spec.down).weight
    state = make_state(len(layers), down_w.shape[1], down_w.device)
    state.held_layers = [i for i, _ in owned]
    for i, host in owned:
        if spec.mlp is not None:
            name = f"{spec.layers}.{i}.{spec.mlp}"
            setattr(layers[i], spec.mlp, GriffinMLP(host, spec, i, name, state))
        else:
            _reroute_inline(host, GriffinMLP(host, spec, i, f"{spec.layers}.{i}", state), spec)
    return state


def _ffn_host(layer: nn.Module, spec: ArchSpec) -> nn.Module | None:
    if spec.mlp is None:
        return layer if hasattr(layer, spec.down) else None
    return getattr(layer, spec.mlp, None)


def _reroute_inline(layer: nn.Module, griffin: GriffinMLP, spec: ArchSpec) -> None:
    """The layer calls ``x, _ = fc1(x); x = act(x); x, _ = fc2(x)``: fc1 and the
    activation become pass-throughs and fc2 runs the whole GriffinMLP. The
    linears keep their names and parameters; only these instances' forwards change."""
    setattr(layer, spec.act, nn.Identity())  # vLLM shares activation modules between layers
    getattr(layer, spec.gate_up).forward = lambda x: (x, None)
    getattr(layer, spec.down).forward = lambda x: (griffin(x), None)
    # Reachable for inspection, without registering its modules a second time.
    layer.__dict__["griffin_mlp"] = griffin


def _check_unquantized(mlp: nn.Module, spec: ArchSpec) -> None:
    for attr in (spec.gate_up, spec.down):
        linear = getattr(mlp, attr)
        method = getattr(linear, "quant_method", None)
        if method is not None and type(method).__name__ != "UnquantizedLinearMethod":
            raise ValueError(
                f"GRIFFIN needs unquantized MLP weights; {attr} uses {type(method).__name__}. "
                "Serve an unquantized (bf16/fp16/fp32) checkpoint, or drop the griffin additional_config.")
        if not isinstance(getattr(linear, "weight", None), torch.Tensor):
            raise ValueError(f"GRIFFIN cannot read {attr}.weight (LoRA or a custom linear?)")
