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

    plan = plan_stages(gm, [DeviceSpec.cpu(), DeviceSpec.cpu()])
    stages = split_stages(gm, plan)          # graphopt.distributed runs them
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx

from graphopt.capture import concrete
from graphopt.passes.base import get_attr_value
from graphopt.report import node_flops


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model knows of one device (a pipeline stage runs on it)."""

    name: str  # a torch device ("cpu", "cuda:0"); repeat a name for several stages on it
    flops_per_s: float
    memory_bytes_per_s: float = 10e9
    memory_bytes: int | None = None  # weights a stage may hold; None: no limit
    link_bytes_per_s: float = 1e9  # to this device from the previous stage's

    @classmethod
    def cpu(cls, name: str = "cpu", **overrides: Any) -> DeviceSpec:
        """A CPU with its matmul throughput measured here (`measure_flops`)."""
        return cls(name, overrides.pop("flops_per_s", None) or measure_flops(), **overrides)


_MEASURED: dict[str, float] = {}


def measure_flops(device: str = "cpu", size: int = 256, seconds: float = 0.05) -> float:
    """FLOP/s of a float32 matmul on `device` (a short calibration run, cached per device)."""
    if device not in _MEASURED:
        a = torch.randn(size, size, device=device)
        torch.mm(a, a)  # warm up
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, a)
            runs += 1
        _MEASURED[device] = 2 * size**3 * runs / (time.perf_counter() - start)
    return _MEASURED[device]


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

    def describe(self) -> str:
        lines = [f"{len(self.stages)} stages, imbalance {self.imbalance:.3f} (slowest / mean)"]
        for i, s in enumerate(self.stages):
            lines.append(
                f"  stage {i} on {s.device.name}: {len(s.nodes)} nodes, {s.flops / 1e6:.1f} "
                f"MFLOP, weights {s.params / 1e6:.2f} MB, {s.bytes_in / 1e3:.1f} kB in, "
                f"{s.compute_s * 1e3:.3f} ms + {s.transfer_s * 1e3:.3f} ms transfer"
            )
        return "\n".join(lines)


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
    order = [n.name for n in gm.graph.nodes if n.op == "call_function"]
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

    def stage_time(i: int, j: int, d: DeviceSpec) -> tuple[float, float]:
        compute = (prefix_flops[j] - prefix_flops[i]) / d.flops_per_s + (
            prefix_bytes[j] - prefix_bytes[i]
        ) / d.memory_bytes_per_s
        transfer = cut_bytes[i] / d.link_bytes_per_s if i > 0 else 0.0
        return compute, transfer

    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for s in range(1, k + 1):
        d = devices[s - 1]
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                if d.memory_bytes is not None and params(i, j) > d.memory_bytes:
                    continue
                t = max(best[s - 1][i], sum(stage_time(i, j, d)))
                if t < best[s][j]:
                    best[s][j], back[s][j] = t, i
    if best[k][n] == inf:
        raise ValueError(
            f"no split of the graph into {k} stages fits the devices' memory "
            f"({[d.memory_bytes for d in devices]} bytes of weights)"
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
        stages.append(Stage(d, names, flops, params(i, j), bytes_in, compute, transfer))
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
