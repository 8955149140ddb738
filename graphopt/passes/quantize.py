"""quantize: post-training int8 quantization of convolutions and linear layers.

The rewrite is the quantize/dequantize ("QDQ") form torchao's PT2E flow produces, so every
backend sees one representation: graphs graphopt quantized and graphs a user quantized with
PT2E alike. inductor turns it into oneDNN int8 kernels, TVM and the float reference run it
as written. Numbers follow `graphopt.int8` (the one int8 semantics).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.fx

from graphopt import int8, targets
from graphopt.config import Config
from graphopt.ops import CLAMPS
from graphopt.passes.base import (
    Emitter,
    PassResult,
    Site,
    fake_mode_of,
    find_sites,
    get_attr_value,
    insert_constant,
)

log = logging.getLogger("graphopt")

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

PERCENTILE = 99.99  # observer="percentile" clips the activation range to these percentiles
_SAMPLES_PER_BATCH = 1 << 16  # values kept per batch and activation for percentiles


@dataclass
class LayerQuant:
    """What the pass decided for one layer (kept in the report)."""

    layer: str
    op: str
    quantized: bool
    act_scale: float | None = None
    act_zero_point: int | None = None
    channels: int = 0
    sensitivity: float | None = None  # output error with only this layer in int8


@dataclass
class QuantSummary:
    calibration_batches: int
    observer: str
    accuracy_budget: float | None
    output_error: float  # relative L2 error of the outputs on the calibration data
    layers: list[LayerQuant] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_float(self) -> list[str]:
        return [layer.layer for layer in self.layers if not layer.quantized]


def _weight_oc_first(gm: torch.fx.GraphModule, site: Site) -> torch.Tensor:
    """The weight with output channels first: conv as is, linear's [in, out] transposed."""
    value = get_attr_value(gm, site.weight).detach()
    return value if site.kind == "conv2d" else value.t().contiguous()


class _Observer:
    """An activation's range over the calibration batches: min/max, or percentiles."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if self.method == "percentile":
            if x.numel() > _SAMPLES_PER_BATCH:
                pick = torch.randint(x.numel(), (_SAMPLES_PER_BATCH,), generator=self.generator)
                x = x[pick]
            self.samples.append(x.clone())

    def range(self) -> tuple[float, float]:
        if self.method == "percentile" and self.samples:
            values = torch.cat(self.samples)
            q = torch.tensor([1 - PERCENTILE / 100, PERCENTILE / 100], dtype=torch.float32)
            lo, hi = torch.quantile(values, q).tolist()
            return lo, hi
        if self.lo > self.hi:  # never saw a value
            return 0.0, 0.0
        return self.lo, self.hi


@dataclass
class _Plan:
    """Quantization parameters of one site."""

    act_scale: float
    act_zero_point: int
    act_qmax: int
    qweight: torch.Tensor  # int8, output channels first
    scales: torch.Tensor  # float32 per output channel
    sim_weight: torch.Tensor  # the dequantized weight, in the graph's layout
    output: tuple[torch.fx.Node, float, int] | None = None  # (node, scale, zp) quantized after


class _Runner(torch.fx.Interpreter):
    """Runs the float graph on real inputs; observes activations and/or simulates int8 sites."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        sites: dict[torch.fx.Node, Site],
        observers: dict[torch.fx.Node, _Observer] | None = None,
        simulate: dict[torch.fx.Node, _Plan] | None = None,
        extra: dict[torch.fx.Node, tuple[float, int, int]] | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.sites, self.observers, self.simulate = sites, observers or {}, simulate or {}
        self.requantize = {
            plan.output[0]: (plan.output[1], plan.output[2], plan.act_qmax)
            for plan in self.simulate.values()
            if plan.output is not None
        }
        self.requantize.update(extra or {})

    def run_node(self, node: torch.fx.Node) -> Any:
        plan = self.simulate.get(node)
        if plan is None:
            out = super().run_node(node)
        else:
            site = self.sites[node]
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            args = list(args)
            x = args[site.act_index]
            args[site.act_index] = int8.fake_quantize(
                x, plan.act_scale, plan.act_zero_point, plan.act_qmax
            )
            args[site.weight_index] = plan.sim_weight
            out = node.target(*args, **kwargs)
        observer = self.observers.get(node)
        if observer is not None:
            observer.update(out)
        if node in self.requantize:
            scale, zero_point, qmax = self.requantize[node]
            out = int8.fake_quantize(out, scale, zero_point, qmax)
        return out


def _run(
    gm: torch.fx.GraphModule,
    batches: Sequence[Sequence[Any]],
    sites: dict[torch.fx.Node, Site],
    observers: dict[torch.fx.Node, _Observer] | None = None,
    simulate: dict[torch.fx.Node, _Plan] | None = None,
    extra: dict[torch.fx.Node, tuple[float, int, int]] | None = None,
) -> list[list[torch.Tensor]]:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    outs = []
    with unset_fake_temporarily(), torch.no_grad():
        for batch in batches:
            result = _Runner(gm, sites, observers, simulate, extra).run(*batch)
            flat = torch.utils._pytree.tree_leaves(result)
            outs.append([t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()])
    return outs


def _relative_error(reference: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> float:
    """graphopt.testing.relative_error over every output of every batch together."""
    from graphopt.testing import relative_error

    def flat(batches: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([t.detach().flatten() for batch in batches for t in batch])

    return relative_error(flat(reference), flat(got))


def quantize(
    gm: torch.fx.GraphModule, cfg: Config, calibration: Sequence[Sequence[Any]] | None = None
) -> PassResult:
    """Quantize conv2d and linear layers to int8 (`cfg.quantize == "int8"`), calibrated.

    Weights: per-output-channel symmetric int8. Activations entering each layer: per-tensor
    asymmetric uint8, their range observed on `calibration` (min/max, or the 0.01/99.99
    percentiles with `cfg.observer="percentile"`). With `cfg.accuracy_budget`, the layers whose
    int8 error hurts the outputs most stay in float until the relative output error on the
    calibration data is within the budget. Biases stay float (the kernels add them in float;
    `graphopt.int8.quantize_bias` is the integer form). On target="cpu"/"onnx" of an x86 CPU
    without VNNI, activations use [0, 127] (`graphopt.int8.host_activation_qmax`). On
    target="onnx", conv outputs and residual adds are quantized too (onnxruntime's integer
    kernels need a quantize after the conv); the reported error is the rewritten graph's. On
    target="cpu", a residual add right after a conv reads its other operand quantized, so
    inductor fuses the add into the int8 conv (see `_conv_adds`).

    Before -> after (a linear layer; w_t is the folded [in, out] weight):
        y = addmm(b, x, w_t)
        -> xq = quantize_per_tensor(x, s, z, 0, 255, uint8)
           xd = dequantize_per_tensor(xq, s, z, 0, 255, uint8)
           wd = dequantize_per_channel(w_int8, w_scales, w_zeros, 0, -128, 127, int8)
           y = addmm(b, xd, permute(wd, [1, 0]))

    Args:
        gm: a frozen core-ATen graph; changed in place.
        cfg: uses quantize, observer, accuracy_budget.
        calibration: inputs for gm's placeholders, one list per batch (at least one).

    Returns:
        PassResult with stats {"quantized": layers in int8, "kept_float": layers left in float};
        the per-layer decisions are in gm.meta["graphopt.quantization"] (a QuantSummary).
    """
    if cfg.quantize != "int8":
        return PassResult(gm, False, {"quantized": 0, "kept_float": 0})
    if not calibration:
        raise ValueError("quantize='int8' needs at least one calibration batch")
    start = time.perf_counter()
    mode = fake_mode_of(gm)
    if mode is None:
        raise ValueError("the quantize pass needs meta['val'] on the graph (a traced graph)")
    sites = {site.node: site for site in find_sites(gm)}
    if not sites:
        gm.meta["graphopt.quantization"] = QuantSummary(
            len(calibration), cfg.observer, cfg.accuracy_budget, 0.0, [], 0.0
        )
        return PassResult(gm, False, {"quantized": 0, "kept_float": 0})
    acts = {site.act for site in sites.values()}
    # The target's Int8Policy (graphopt/targets.py) says what its integer kernels fuse.
    # onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into its integer conv only
    # with a quantize after the conv: for target="onnx" every conv whose output (after its
    # ReLU, if any) is not already quantized for a next layer gets one, as onnxruntime's own
    # quantize_static does. (Linear layers gained nothing from it on BERT, and lost accuracy.)
    # target="hls" (integer-only hardware) goes further: every layer's output is quantized, and
    # so is the output of every add, concat and average pool (their integer forms need an
    # output scale); only float outputs of the model's last conv/linear stay float.
    policy = targets.TARGETS[cfg.target].int8
    outputs = {}
    for node in (n for n, site in sites.items() if site.kind in policy.quantized_outputs):
        out = _after_activation(node)
        if not _quantized_later(out, acts) and all(u.op != "output" for u in out.users):
            outputs[node] = out  # (model outputs stay float: no 8-bit logits)
    extra = []  # (hls, cpu) non-layer values to quantize
    if policy.rescale_ops:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _RESCALING_OPS:
                out = _after_activation(node)
                if not _quantized_later(out, acts):
                    extra.append(out)
    # target="cpu": inductor fuses a residual add into the int8 conv that feeds it (oneDNN's sum
    # post-op: qconv2d_pointwise.binary) when the add's other operand is dequantized int8, as
    # torchao's X86InductorQuantizer arranges. Those adds read the dequantized copy of a value
    # already quantized for a layer; another operand read by the add alone (ResNet's
    # downsample conv) is quantized. (Other readers of an operand never see it quantized.)
    fused_adds: dict[torch.fx.Node, torch.fx.Node] = {}
    if policy.fuse_residual_adds:
        fused_adds = _conv_adds(gm, sites)
        for other in fused_adds.values():
            if other not in acts and other not in extra and len(other.users) == 1:
                extra.append(other)
    observers = {n: _Observer(cfg.observer) for n in acts | set(outputs.values()) | set(extra)}
    log.info("graphopt quantize: calibrating %d layers on %d batches", len(sites), len(calibration))
    reference = _run(gm, calibration, sites, observers=observers)
    # cpu (oneDNN) and onnx (onnxruntime's MLAS) multiply u8 x s8 with saturating int16 pairs
    # on x86 without VNNI; TVM and the FPGA accumulate exactly.
    qmax = int8.host_activation_qmax() if policy.saturating_pairs else int8.ACT_QMAX
    plans = {node: _plan(gm, site, observers[site.act], qmax) for node, site in sites.items()}
    for node, out in outputs.items():
        plans[node].output = (out, *int8.activation_qparams(*observers[out].range(), qmax))
    extra_qparams = {
        out: (*int8.activation_qparams(*observers[out].range(), qmax), qmax) for out in extra
    }

    sensitivity: dict[torch.fx.Node, float] = {}
    active = dict(plans)
    error = _relative_error(
        reference, _run(gm, calibration, sites, simulate=active, extra=extra_qparams)
    )
    if cfg.accuracy_budget is not None and error > cfg.accuracy_budget:
        for i, node in enumerate(sites):
            only = {node: plans[node]}
            sensitivity[node] = _relative_error(
                reference, _run(gm, calibration, sites, simulate=only, extra=extra_qparams)
            )
            log.info(
                "graphopt quantize: sensitivity %d/%d %s: %.4g",
                i + 1,
                len(sites),
                sites[node].name,
                sensitivity[node],
            )
        for node in sorted(sites, key=lambda n: -sensitivity[n]):
            if error <= cfg.accuracy_budget:
                break
            del active[node]
            error = _relative_error(
                reference, _run(gm, calibration, sites, simulate=active, extra=extra_qparams)
            )
            log.info(
                "graphopt quantize: %s kept in float, output error now %.4g",
                sites[node].name,
                error,
            )

    layers = []
    for node, site in sites.items():
        plan = plans[node]
        layers.append(
            LayerQuant(
                site.name,
                site.kind,
                node in active,
                plan.act_scale,
                plan.act_zero_point,
                int(plan.scales.numel()),
                sensitivity.get(node),
            )
        )
    _rewrite(
        gm,
        sites,
        active,
        mode,
        extra_qparams,
        readers=policy.readers,
        adds=set(fused_adds) if policy.fuse_residual_adds else None,
    )
    if active:  # the error the rewritten graph really has (the simulation leaves out the adds)
        error = _relative_error(reference, _run(gm, calibration, {}))
    summary = QuantSummary(
        len(calibration),
        cfg.observer,
        cfg.accuracy_budget,
        error,
        layers,
        time.perf_counter() - start,
    )
    gm.meta["graphopt.quantization"] = summary
    if cfg.accuracy_budget is not None and error > cfg.accuracy_budget:
        log.warning(
            "graphopt quantize: output error %.4g exceeds accuracy_budget %.4g with every layer "
            "in float but the unquantizable ones",
            error,
            cfg.accuracy_budget,
        )
    stats = {"quantized": len(active), "kept_float": len(sites) - len(active)}
    return PassResult(gm, bool(active), stats)


# Ops whose integer form rescales to a new output scale (target="hls" quantizes their outputs).
_RESCALING_OPS = (
    aten.add.Tensor,
    aten.cat.default,
    aten.avg_pool2d.default,
    aten.mean.dim,
    aten._adaptive_avg_pool2d.default,
)
# (narrower than graphopt.ops.RESHAPES: the reshapes a layer input was seen behind)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _conv_adds(
    gm: torch.fx.GraphModule, sites: dict[torch.fx.Node, Site]
) -> dict[torch.fx.Node, torch.fx.Node]:
    """Residual adds that inductor can fuse into the int8 conv before them: add(conv, other)
    where the add is the conv's only reader. Of two such convs the later one is fused (oneDNN
    adds into `other` in place, so `other` must be computed first). Maps add -> other."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.add.Tensor:
            continue
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        a, b = node.args
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            continue
        convs = [
            v for v in (a, b) if v in sites and sites[v].kind == "conv2d" and len(v.users) == 1
        ]
        if convs:
            fused = max(convs, key=order.__getitem__)
            found[node] = b if fused is a else a
    return found


def _quantized_later(node: torch.fx.Node, acts: set[torch.fx.Node]) -> bool:
    """`node`, or the end of a chain of views of it (a flatten), is quantized for a layer."""
    while True:
        if node in acts:
            return True
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _VIEWS:
            return False
        node = users[0]


def _after_activation(node: torch.fx.Node) -> torch.fx.Node:
    """The layer's ReLU/ReLU6 when that is its only user, else the layer itself."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in CLAMPS:
        return users[0]
    return node


def _plan(gm: torch.fx.GraphModule, site: Site, observer: _Observer, qmax: int) -> _Plan:
    lo, hi = observer.range()
    scale, zero_point = int8.activation_qparams(lo, hi, qmax)
    weight = _weight_oc_first(gm, site)
    qweight, scales = int8.quantize_weight(weight, axis=0)
    shape = [-1] + [1] * (weight.dim() - 1)
    sim = qweight.float() * scales.view(shape)
    if site.kind == "linear":
        sim = sim.t()
    return _Plan(scale, zero_point, qmax, qweight, scales, sim)


def _rewrite(
    gm: torch.fx.GraphModule,
    sites: dict[torch.fx.Node, Site],
    active: dict[torch.fx.Node, _Plan],
    mode: Any,
    extra: dict[torch.fx.Node, tuple[float, int, int]],
    *,
    readers: str = "layers",
    adds: set[torch.fx.Node] | None = None,
) -> None:
    """Insert the QDQ nodes of every active site. readers: who reads the dequantized copy of
    an activation quantized for a layer: "layers" (those layers only); "adds" (residual adds
    too: every add, so onnxruntime runs them as QLinearAdd, or only those in `adds`, the ones
    inductor fuses into an int8 conv); "all" (every reader, the model's outputs included:
    target="hls", integer-only hardware has no float copy)."""
    graph = gm.graph
    dequantized: dict[tuple[torch.fx.Node, float, int, int], torch.fx.Node] = {}
    for node, plan in active.items():
        site = sites[node]
        emit = Emitter(gm, node, mode)
        act = site.act
        key = (act, plan.act_scale, plan.act_zero_point, plan.act_qmax)
        if key not in dequantized:  # right after the activation: its readers share the pair
            dequantized[key] = _insert_qdq(
                gm, act, plan.act_scale, plan.act_zero_point, plan.act_qmax, mode
            )
        hint = f"{node.name}_weight"
        qweight = insert_constant(gm, plan.qweight, hint + "_int8", before=node)
        scales = insert_constant(gm, plan.scales, hint + "_scale", before=node)
        zeros = torch.zeros(plan.scales.numel(), dtype=torch.int64)
        zero_points = insert_constant(gm, zeros, hint + "_zero_point", before=node)
        weight = emit(
            qd.dequantize_per_channel.default,
            qweight,
            scales,
            zero_points,
            0,
            int8.WEIGHT_DECLARED_QMIN,
            int8.WEIGHT_QMAX,
            int8.WEIGHT_DTYPE,
        )
        if site.kind == "linear":
            weight = emit(aten.permute.default, weight, [1, 0])
        args = list(node.args)
        args[site.act_index] = dequantized[key]
        args[site.weight_index] = weight
        node.args = tuple(args)
        if plan.output is not None:
            out, scale, zero_point = plan.output
            _quantize_for_readers(gm, out, scale, zero_point, plan.act_qmax, mode)
    for out, (scale, zero_point, qmax) in extra.items():
        _quantize_for_readers(gm, out, scale, zero_point, qmax, mode)
    if readers != "layers":
        for (act, *_), dq in dequantized.items():
            for user in list(act.users):
                is_add = user.op == "call_function" and user.target is aten.add.Tensor
                is_add = is_add and (adds is None or user in adds)
                if (readers == "all" and user is not dq.args[0]) or is_add:
                    user.replace_input_with(act, dq)
    graph.lint()
    gm.recompile()


def _insert_qdq(
    gm: torch.fx.GraphModule,
    value: torch.fx.Node,
    scale: float,
    zero_point: int,
    qmax: int,
    mode: Any,
) -> torch.fx.Node:
    """quantize_per_tensor + dequantize_per_tensor of `value`, right after it; the dequantize."""
    after = value.next
    while after.op == "placeholder":
        after = after.next
    emit = Emitter(gm, after, mode)
    q_args = (scale, zero_point, int8.ACT_QMIN, qmax, int8.ACT_DTYPE)
    q = emit(qd.quantize_per_tensor.default, value, *q_args)
    return emit(qd.dequantize_per_tensor.default, q, *q_args)


def _quantize_for_readers(
    gm: torch.fx.GraphModule,
    value: torch.fx.Node,
    scale: float,
    zero_point: int,
    qmax: int,
    mode: Any,
) -> None:
    """Quantize `value` right after it (`_insert_qdq`); all its readers get the dequantized."""
    users = list(value.users)
    dq = _insert_qdq(gm, value, scale, zero_point, qmax, mode)
    for user in users:
        user.replace_input_with(value, dq)


def onednn_saturation_warning(gm: torch.fx.GraphModule) -> str | None:
    """A warning when a QDQ graph (e.g. from PT2E) uses 8-bit activations on a CPU whose
    oneDNN int8 kernels saturate them (no VNNI, see `graphopt.int8.host_activation_qmax`)."""
    qmax = int8.host_activation_qmax()
    wide = [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in (qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)
        and n.args[5] == torch.uint8
        and n.args[4] > qmax
    ]
    if not wide:
        return None
    return (
        f"{len(wide)} activations are quantized to [0, 255] but this CPU has no VNNI: "
        f"oneDNN's u8s8 kernels saturate int16 pairs and can be several percent off; quantize "
        f"with graphopt (quantize='int8' uses [0, {qmax}] here) or run on a VNNI CPU "
        f"(first: {wide[0]})"
    )
