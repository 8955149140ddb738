"""partition_stages: split a graph into one pipeline stage per device by a cost model.

Cost model, per call node (kept on the networkx DAG of the graph, `cost_graph`):
    flops   torch's flop formula on the node's shapes (graphopt.report.node_flops)
    bytes   the bytes of its output (what crosses a cut if a later stage reads it)
    params  the bytes of the constants it reads (a stage holds its own weights)
A stage's time on a device is flops / flops_per_s + bytes_written / memory_bytes_per_s, plus
the bytes entering it over the link from the previous device / link_bytes_per_s.

Planner: stages are contiguous runs of the graph's topological order, in device order. Dynamic
programming over the cut positions minimizes the slowest stage (compute + incoming transfer),
with each stage's weights within its device's memory. Any cut of a topological order is a
valid pipeline: every value a stage reads was made by an earlier stage or is a model input.

Capability: a device may say which ops its backend lowers (`DeviceSpec.supports`, from the
backend's op registry: TVM's for a CUDA device). A stage goes to a device only if its backend
lowers every op in it. When no split satisfies that (an op only PyTorch has sits where every
order of devices must take it), the planner drops the rule, and the ops the device's backend
lacks run in PyTorch on that device (`Stage.fallback`, in the report).

    plan = plan_stages(gm, [DeviceSpec.cpu(), DeviceSpec.cpu()])
    stages = split_stages(gm, plan)          # graphopt.distributed runs them
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx

from graphopt.ops import op_name
from graphopt.passes.base import get_attr_value
from graphopt.report import StageRecord, StagesRecord, node_flops
from graphopt.shapes import concrete


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model knows of one device (a pipeline stage runs on it)."""

    name: str  # a torch device ("cpu", "cuda:0"); repeat a name for several stages on it
    flops_per_s: float
    memory_bytes_per_s: float = 10e9
    memory_bytes: int | None = None  # weights a stage may hold; None: no limit
    link_bytes_per_s: float = 1e9  # to this device from the previous stage's
    # Whether this device's backend lowers a node (None: every op, as inductor does).
    supports: Callable[[torch.fx.Node], bool] | None = field(default=None, compare=False)
    backend: str = ""  # what lowers a stage here ("inductor", "tvm-cuda"), for the report

    @classmethod
    def cpu(cls, name: str = "cpu", **overrides: Any) -> DeviceSpec:
        """A CPU with its matmul throughput measured here (`measure_flops`)."""
        return cls(name, overrides.pop("flops_per_s", None) or measure_flops(), **overrides)


_MEASURED: dict[str, float] = {}


def measure_flops(device: str = "cpu", size: int | None = None, seconds: float = 0.05) -> float:
    """FLOP/s of a float32 matmul on `device` (a short calibration run, cached per device;
    256x256 on a CPU, 2048x2048 on a GPU, which a small product leaves idle)."""
    if device not in _MEASURED:
        size = size or (256 if torch.device(device).type == "cpu" else 2048)
        a = torch.randn(size, size, device=device)
        _MEASURED[device] = 2 * size**3 / _seconds_per_call(lambda: torch.mm(a, a), device, seconds)
    return _MEASURED[device]


def measure_bandwidth(device: str = "cpu", nbytes: int = 1 << 26, seconds: float = 0.05) -> float:
    """Bytes/s of a tensor copy on `device`, read and write counted (cached per device)."""
    key = f"{device} memory"
    if key not in _MEASURED:
        a, b = torch.empty(nbytes // 4, device=device), torch.empty(nbytes // 4, device=device)
        _MEASURED[key] = 2 * nbytes / _seconds_per_call(lambda: b.copy_(a), device, seconds)
    return _MEASURED[key]


def measure_link(source: str, dest: str, nbytes: int = 1 << 24, seconds: float = 0.05) -> float:
    """Bytes/s of copying a tensor from device `source` to `dest` (cached per pair)."""
    key = f"{source}->{dest}"
    if key not in _MEASURED:
        a = torch.empty(nbytes // 4, device=source)
        cuda = torch.device(dest) if torch.device(dest).type == "cuda" else torch.device(source)
        _MEASURED[key] = nbytes / _seconds_per_call(lambda: a.to(dest), cuda, seconds)
    return _MEASURED[key]


def _seconds_per_call(fn: Callable[[], Any], device: Any, seconds: float) -> float:
    """Mean wall time of `fn` over `seconds` after one warm-up call, waiting for the GPU."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda *_: None)
    fn()
    sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        runs += 1
    sync(device)
    return (time.perf_counter() - start) / runs


@dataclass
class NodeCost:
    flops: int
    bytes: int  # output bytes
    params: int  # bytes of constants read


@dataclass
class Stage:
    device: DeviceSpec
    nodes: list[str]
    flops: int
    params: int
    bytes_in: int  # bytes crossing the cut into this stage
    compute_s: float
    transfer_s: float
    fallback: list[str] = field(default_factory=list)  # ops its device's backend lacks

    @property
    def seconds(self) -> float:
        return self.compute_s + self.transfer_s


@dataclass
class StagePlan:
    stages: list[Stage]
    assignment: dict[str, int] = field(repr=False)  # node name -> stage index

    @property
    def imbalance(self) -> float:
        """Slowest stage / mean stage time (cost model): 1.0 is a perfect split."""
        times = [s.seconds for s in self.stages]
        mean = sum(times) / len(times)
        return max(times) / mean if mean > 0 else 1.0

    @property
    def bottleneck_s(self) -> float:
        return max(s.seconds for s in self.stages)

    def record(self) -> StagesRecord:
        """The plan as the report keeps it (plain data)."""
        return StagesRecord(
            self.imbalance,
            [
                StageRecord(
                    s.device.name,
                    s.device.backend,
                    len(s.nodes),
                    s.flops,
                    s.params,
                    s.bytes_in,
                    s.compute_s,
                    s.transfer_s,
                    list(s.fallback),
                )
                for s in self.stages
            ],
        )

    def describe(self) -> str:
        return str(self.record())


def _nbytes(value: Any) -> int:
    values = value if isinstance(value, list | tuple) else [value]
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += int(concrete(v.numel())) * v.element_size()
    return total


def cost_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The graph as a networkx DAG: nodes carry NodeCost ("cost"); edges the bytes they carry."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    dag = nx.DiGraph()
    with unset_fake_temporarily():
        for node in gm.graph.nodes:
            if node.op in ("call_function", "placeholder"):
                params = sum(
                    _nbytes(get_attr_value(gm, a))
                    for a in node.all_input_nodes
                    if a.op == "get_attr"
                )
                cost = NodeCost(node_flops(node), _nbytes(node.meta.get("val")), params)
                dag.add_node(node.name, cost=cost, op=node.op)
                for a in node.all_input_nodes:
                    if a.op in ("call_function", "placeholder"):
                        dag.add_edge(a.name, node.name, bytes=dag.nodes[a.name]["cost"].bytes)
    return dag


def plan_stages(gm: torch.fx.GraphModule, devices: list[DeviceSpec]) -> StagePlan:
    """One stage per device (in order), minimizing the slowest stage; see the module doc.

    Raises:
        ValueError: fewer call nodes than devices, or no split fits the devices' memory.
    """
    dag = cost_graph(gm)
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    order = list(nodes)
    k, n = len(devices), len(order)
    if k < 1:
        raise ValueError("partition needs at least one device")
    if n < k:
        raise ValueError(f"the graph has {n} operations, fewer than the {k} devices asked for")
    costs = [dag.nodes[name]["cost"] for name in order]
    position = {name: i for i, name in enumerate(order)}
    # cut_bytes[j]: bytes of values made before position j (or inputs) and read at >= j
    cut_bytes = [0] * (n + 1)
    output_names = {o.name for o in _output_values(gm)}
    for name in dag.nodes:
        start = position.get(name, -1) + 1  # inputs count as made before position 0
        readers = [position[s] for s in dag.successors(name) if s in position]
        last = max(readers, default=-1)
        if name in output_names:
            last = n  # an output travels to the end
        for j in range(start, last + 1):
            if j <= n:
                cut_bytes[j] += dag.nodes[name]["cost"].bytes
    prefix_flops, prefix_bytes, prefix_params = [0], [0], [0]
    for c in costs:
        prefix_flops.append(prefix_flops[-1] + c.flops)
        prefix_bytes.append(prefix_bytes[-1] + c.bytes)
        prefix_params.append(prefix_params[-1] + c.params)

    def params(i: int, j: int) -> int:
        return prefix_params[j] - prefix_params[i]

    # A cut may not separate a multi-output op from the getitems that read its outputs: a
    # stage hands on tensors, not tuples (inductor refuses a graph that returns one).
    cut_ok = [True] * (n + 1)
    for g, name in enumerate(order):
        node = nodes[name]
        producer = node.args[0] if node.target is operator.getitem else None
        if isinstance(producer, torch.fx.Node) and producer.name in position:
            for j in range(position[producer.name] + 1, g + 1):
                cut_ok[j] = False

    # missing[d]: the nodes device d's backend cannot lower (asked once per node and device);
    # lacking[d][j]: how many of them come before position j
    missing = [
        {m for m in order if d.supports is not None and not d.supports(nodes[m])} for d in devices
    ]
    lacking = []
    for lacks in missing:
        counts = [0]
        for name in order:
            counts.append(counts[-1] + (name in lacks))
        lacking.append(counts)

    def stage_time(i: int, j: int, d: DeviceSpec) -> tuple[float, float]:
        compute = (prefix_flops[j] - prefix_flops[i]) / d.flops_per_s + (
            prefix_bytes[j] - prefix_bytes[i]
        ) / d.memory_bytes_per_s
        transfer = cut_bytes[i] / d.link_bytes_per_s if i > 0 else 0.0
        return compute, transfer

    def search(capable_only: bool) -> list[list[int]] | None:
        """back[s][j]: where stage s starts when stages 1..s cover [0, j) at least cost."""
        inf = math.inf
        best = [[inf] * (n + 1) for _ in range(k + 1)]
        back = [[-1] * (n + 1) for _ in range(k + 1)]
        best[0][0] = 0.0
        for s in range(1, k + 1):
            d, lack = devices[s - 1], lacking[s - 1]
            for j in range(s, n - (k - s) + 1):
                for i in range(s - 1, j):
                    if best[s - 1][i] == inf or not cut_ok[i]:
                        continue
                    if d.memory_bytes is not None and params(i, j) > d.memory_bytes:
                        continue
                    if capable_only and lack[j] - lack[i]:
                        continue
                    t = max(best[s - 1][i], sum(stage_time(i, j, d)))
                    if t < best[s][j]:
                        best[s][j], back[s][j] = t, i
        return back if best[k][n] < inf else None

    back = search(capable_only=True) or search(capable_only=False)
    if back is None:
        raise ValueError(
            f"no split of the graph into {k} stages fits the devices' memory "
            f"({[d.memory_bytes for d in devices]} bytes of weights) with every multi-output "
            "op in one stage with its getitems"
        )
    bounds, j = [], n
    for s in range(k, 0, -1):
        i = back[s][j]
        bounds.append((i, j))
        j = i
    bounds.reverse()
    stages, assignment = [], {}
    for s, ((i, j), d) in enumerate(zip(bounds, devices)):
        compute, transfer = stage_time(i, j, d)
        names = order[i:j]
        assignment.update(dict.fromkeys(names, s))
        flops, bytes_in = prefix_flops[j] - prefix_flops[i], cut_bytes[i] if i else 0
        fallback = [op_name(nodes[m].target) for m in names if m in missing[s]]
        stages.append(Stage(d, names, flops, params(i, j), bytes_in, compute, transfer, fallback))
    return StagePlan(stages, assignment)


def _output_values(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    out = gm.graph.find_nodes(op="output")[0].args[0]
    return [v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.fx.Node)]


def split_stages(gm: torch.fx.GraphModule, plan: StagePlan) -> list[torch.fx.GraphModule]:
    """One GraphModule per stage. Stage s takes the values live across cut s (the model's
    inputs for stage 0) and returns those live across cut s+1 (the model's flat outputs for
    the last stage), so each stage feeds only the next: the shape a pipeline runtime needs.
    The constants a stage reads are copied into it."""
    order = [n for n in gm.graph.nodes if n.op == "call_function"]
    stage_of = {n: plan.assignment[n.name] for n in order}
    placeholders = gm.graph.find_nodes(op="placeholder")
    outputs = _output_values(gm)
    k = len(plan.stages)

    def live_after(s: int) -> list[torch.fx.Node]:
        """Values made by stages <= s (or inputs) and read by a stage > s or the output."""
        live = []
        for v in [*placeholders, *order]:
            if v in stage_of and stage_of[v] > s:
                continue
            readers = [stage_of[u] for u in v.users if u in stage_of]
            if any(r > s for r in readers) or (v in outputs and s < k - 1):
                live.append(v)
        return live

    live = [live_after(s) for s in range(k - 1)]  # the values crossing each cut
    modules = []
    for s in range(k):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs = placeholders if s == 0 else live[s - 1]
        for v in inputs:
            env[v] = graph.placeholder(v.name)
            env[v].meta = dict(v.meta)
        root = torch.nn.Module()
        for node in order:
            if stage_of[node] != s:
                continue
            for a in node.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    value = get_attr_value(gm, a)
                    name = a.target.replace(".", "_")
                    if isinstance(value, torch.nn.Parameter | torch.Tensor):
                        root.register_buffer(name, value.detach())
                    env[a] = graph.get_attr(name)
                    env[a].meta = dict(a.meta)
            env[node] = graph.node_copy(node, env.__getitem__)
        if s == k - 1:
            out = gm.graph.find_nodes(op="output")[0].args[0]
            graph.output(torch.fx.node.map_arg(out, env.__getitem__))
        else:
            graph.output(tuple(env[v] for v in live[s]))
        module = torch.fx.GraphModule(root, graph, class_name=f"Stage{s}")
        modules.append(module)
    return modules


# Stage colours (fill) for the SVG: distinct, light enough for black text.
_STAGE_COLOURS = ("#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd", "#d0e0e3")


def plan_svg(gm: torch.fx.GraphModule, plan: StagePlan) -> str:
    """An SVG picture of `gm` split by `plan`: one box per op, coloured by stage, in columns by
    depth from the inputs; edges that cross a cut are red and say how many bytes they carry
    (hover a box or an edge for details); a legend gives each stage's device and cost."""
    from xml.sax.saxutils import escape

    dag = cost_graph(gm)
    calls = [name for name in dag.nodes if name in plan.assignment]
    ops = {n.name: n for n in gm.graph.nodes}
    column: dict[str, int] = {}
    for name in nx.topological_sort(dag):  # depth over ops only (inputs are not drawn)
        preds = [column[p] + 1 for p in dag.predecessors(name) if p in column]
        if name in plan.assignment:
            column[name] = max(preds, default=0)
    rows: dict[int, int] = {}
    place: dict[str, tuple[float, float]] = {}
    box_w, box_h, dx, dy, top = 96, 26, 124, 48, 48
    for name in calls:
        row = rows.get(column[name], 0)
        rows[column[name]] = row + 1
        place[name] = (20 + column[name] * dx, top + row * dy)
    legend_top = top + max(rows.values(), default=1) * dy + 20
    width = 40 + max(column.values(), default=0) * dx + box_w
    height = legend_top + 22 * len(plan.stages) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="20" y="18" font-size="13">{len(plan.stages)} stages, imbalance '
        f"{plan.imbalance:.3f} (slowest / mean, cost model)</text>",
    ]
    for src, dst, data in dag.edges(data=True):
        if src not in place or dst not in place:
            continue
        (x1, y1), (x2, y2) = place[src], place[dst]
        a, b = plan.assignment[src], plan.assignment[dst]
        cut = a != b
        style = 'stroke="#cc0000" stroke-width="2"' if cut else 'stroke="#888888"'
        title = f"{src} -> {dst}: {data['bytes']} bytes" + (f" cross cut {a}|{b}" if cut else "")
        x1, y1, y2 = x1 + box_w, y1 + box_h / 2, y2 + box_h / 2
        lift = 0 if x2 - x1 <= dx else box_h  # an edge that skips columns arcs over the boxes
        out.append(
            f'<path class="{"cut" if cut else "edge"}" fill="none" {style} d="M {x1} {y1} '
            f'C {x1 + 40} {y1 - lift}, {x2 - 40} {y2 - lift}, {x2} {y2}">'
            f"<title>{escape(title)}</title></path>"
        )
    for name in calls:
        x, y = place[name]
        s = plan.assignment[name]
        cost, op = dag.nodes[name]["cost"], op_name(ops[name].target)
        label = op.split(".")[1] if op.startswith("aten.") else op  # aten.relu.default: relu
        title = (
            f"{name}: {op}, stage {s} on {plan.stages[s].device.name}, "
            f"{cost.flops / 1e6:.2f} MFLOP, out {cost.bytes} bytes, weights {cost.params} bytes"
        )
        out.append(
            f'<g class="node" data-stage="{s}"><title>{escape(title)}</title>'
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" '
            f'fill="{_STAGE_COLOURS[s % len(_STAGE_COLOURS)]}" stroke="#444444"/>'
            f'<text x="{x + 5}" y="{y + 17}">{escape(label[:15])}</text></g>'
        )
    for s, stage in enumerate(plan.stages):
        y = legend_top + 22 * s
        by = f" ({stage.device.backend})" if stage.device.backend else ""
        text = (
            f"stage {s} on {stage.device.name}{by}: {len(stage.nodes)} ops, "
            f"{stage.flops / 1e6:.1f} MFLOP, weights {stage.params / 1e6:.2f} MB, "
            f"{stage.bytes_in / 1e3:.1f} kB in, cost model {stage.seconds * 1e3:.3f} ms"
        )
        out.append(
            f'<rect x="20" y="{y}" width="14" height="14" '
            f'fill="{_STAGE_COLOURS[s % len(_STAGE_COLOURS)]}" stroke="#444444"/>'
            f'<text class="legend" x="40" y="{y + 11}">{escape(text)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)
