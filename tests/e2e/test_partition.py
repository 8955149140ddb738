"""Pipeline stages by the cost model (graphopt/passes/partition_stages.py) and their runtimes
(graphopt/distributed.py): in one process and over 2 gloo processes."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

import graphopt
from benchmarks.models import ResNet18
from graphopt.config import Config
from graphopt.distributed import StagedModule, _replan, plan_for, retrace_on
from graphopt.frontend import optimized_graph
from graphopt.passes.base import make_trainable
from graphopt.passes.partition_stages import DeviceSpec, cost_graph, plan_stages, split_stages
from graphopt.testing import assert_same_outputs
from tests.models import MLP, ResidualCNN, SpectralHead

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("devices", [2, 4])
def test_optimize_over_devices_matches_eager_and_reports_the_stages(devices):
    model, x = ResidualCNN().eval(), torch.randn(4, 3, 32, 32)
    optimized = graphopt.optimize(model, (x,), devices=["cpu"] * devices)
    with torch.no_grad():
        assert_same_outputs(model, optimized, (x,))
        assert_same_outputs(model, optimized, (torch.randn(4, 3, 32, 32),))
    report = optimized.report
    stages = [p for p in report.partitions if p.name.startswith("stage")]
    assert [p.name for p in stages] == [f"stage{i}" for i in range(devices)]
    assert all(p.nodes > 0 for p in stages)
    assert f"{devices} stages, imbalance" in str(report)
    # The report keeps the stages as data: a program reads them without parsing text.
    data = json.loads(report.to_json())["stages"]
    assert len(data["stages"]) == devices and data["imbalance"] >= 1.0
    assert all(s["device"] == "cpu" and s["backend"] == "inductor" for s in data["stages"])
    assert sum(s["nodes"] for s in data["stages"]) == sum(p.nodes for p in stages)
    assert sum(s["flops"] for s in data["stages"]) > 0


def _resnet18_graph():
    model = ResNet18().eval()
    captured, gm, _ = plan_for(model, (torch.rand(1, 3, 224, 224),), 1)
    return model, captured, gm


def test_resnet18_in_three_stages_is_balanced_and_runs_as_the_model():
    model, captured, gm = _resnet18_graph()
    cpu = DeviceSpec("cpu", flops_per_s=50e9)  # fixed: the split does not depend on timing
    plan = plan_stages(gm, [cpu] * 3)
    assert plan.imbalance <= 1.15, plan.describe()
    order = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    stage_of = [plan.assignment[name] for name in order]
    assert stage_of == sorted(stage_of) and set(stage_of) == {0, 1, 2}  # contiguous, in order
    # the stages, chained, are the model
    x = torch.rand(1, 3, 224, 224)
    staged = StagedModule(split_stages(gm, plan), ["cpu"] * 3)
    with torch.no_grad():
        got = staged(*captured.flat_inputs((x,)))
        assert_same_outputs(model(x), got[0])
    # the cost model: conv FLOPs from torch's formulas, weights per stage add up
    dag = cost_graph(gm)
    assert sum(dag.nodes[n]["cost"].flops for n in dag.nodes) == pytest.approx(3.64e9, rel=0.01)
    assert sum(s.params for s in plan.stages) == sum(dag.nodes[n]["cost"].params for n in dag.nodes)


def test_the_svg_shows_every_op_in_its_stage_and_every_cut_edge():
    model, x = ResidualCNN().eval(), torch.randn(4, 3, 32, 32)
    optimized = graphopt.optimize(model, (x,), devices=["cpu"] * 3)
    svg = ElementTree.fromstring(optimized.report.stages_svg)
    ns = "{http://www.w3.org/2000/svg}"
    captured, gm, _ = plan_for(model, (x,), 1)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    boxes = svg.findall(f"{ns}g[@class='node']")
    assert len(boxes) == len(calls)
    stage_of = {b.find(f"{ns}title").text.split(":")[0]: int(b.get("data-stage")) for b in boxes}
    assert sorted(set(stage_of.values())) == [0, 1, 2]
    order = [stage_of[n.name] for n in calls]
    assert order == sorted(order)  # stages are contiguous runs of the order
    crossing = sum(
        1
        for n in calls
        for u in n.users
        if u.name in stage_of and stage_of[u.name] != stage_of[n.name]
    )
    cuts = svg.findall(f"{ns}path[@class='cut']")
    assert len(cuts) == crossing > 0
    assert all("bytes cross cut" in c.find(f"{ns}title").text for c in cuts)
    legend = [t.text for t in svg.findall(f"{ns}text[@class='legend']")]
    assert [t.split(":")[0] for t in legend] == [f"stage {i} on cpu (inductor)" for i in range(3)]
    assert "report.stages_svg" in str(optimized.report)


def test_memory_limits_move_the_cuts_or_are_refused():
    _, _, gm = _resnet18_graph()
    free = plan_stages(gm, [DeviceSpec("cpu", 50e9)] * 2)
    heavy = max(s.params for s in free.stages)
    limit = int(heavy * 0.9)  # the balanced split no longer fits: the planner must move a cut
    tight = plan_stages(gm, [DeviceSpec("cpu", 50e9, memory_bytes=limit)] * 2)
    assert all(s.params <= limit for s in tight.stages)
    assert tight.assignment != free.assignment
    with pytest.raises(ValueError, match="fits the devices' memory"):
        plan_stages(gm, [DeviceSpec("cpu", 50e9, memory_bytes=1000)] * 2)


def _tiny_graph(model, x):
    return plan_for(model.eval(), (x,), 1)[1]


def test_a_stage_goes_only_to_a_device_whose_backend_lowers_its_ops():
    """rfft comes after the first linear: a fast device that cannot run it gets the stage
    after it, not the balanced cut before it."""
    gm = _tiny_graph(SpectralHead(), torch.randn(4, 16))
    rfft = next(n.name for n in gm.graph.nodes if "fft" in str(n.target))
    slow, fast = DeviceSpec("cpu", 1e9, backend="inductor"), DeviceSpec("gpu", 1e12)
    no_fft = dataclasses.replace(fast, supports=lambda n: "fft" not in str(n.target))
    unaware = plan_stages(gm, [fast, slow])
    assert unaware.assignment[rfft] == 0  # the fast device takes nearly everything
    aware = plan_stages(gm, [no_fft, slow])
    assert aware.assignment[rfft] == 1 and not any(s.fallback for s in aware.stages)
    # no device can take rfft: the rule is dropped, rfft runs in PyTorch, the report says so
    forced = plan_stages(gm, [no_fft, no_fft])
    assert [s.fallback for s in forced.stages].count(["aten._fft_r2c.default"]) == 1
    assert "run in PyTorch on gpu: aten._fft_r2c.default" in forced.describe()


def test_no_cut_separates_a_multi_output_op_from_its_getitems():
    """As many stages as the graph allows: every op alone except max_pool2d_with_indices,
    which stays with the getitem reading it (a tuple crossing a cut broke inductor)."""
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 32, 32)
    captured, gm, _ = plan_for(model, (x,), 1)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    plan = plan_stages(gm, [DeviceSpec("cpu", 1e9)] * (len(calls) - 1))
    pool = next(n for n in calls if n.target is torch.ops.aten.max_pool2d_with_indices.default)
    (getitem,) = pool.users
    assert plan.assignment[pool.name] == plan.assignment[getitem.name]
    staged = StagedModule(split_stages(gm, plan), ["cpu"] * len(plan.stages))
    with torch.no_grad():
        assert_same_outputs(model(x), staged(*captured.flat_inputs((x,)))[0])
    with pytest.raises(ValueError, match="multi-output op in one stage"):
        plan_stages(gm, [DeviceSpec("cpu", 1e9)] * len(calls))


def test_retrace_on_moves_every_value_and_keeps_symbolic_sizes():
    batch = torch.export.Dim("batch", min=2, max=64)
    _, gm = optimized_graph(
        MLP().eval(), (torch.randn(4, 32),), Config(), dynamic_shapes=({0: batch},)
    )
    shapes = {n.name: tuple(n.meta["val"].shape) for n in gm.graph.nodes if "val" in n.meta}
    retrace_on(gm, torch.device("cuda"))  # fake CUDA tensors need no GPU
    for node in gm.graph.nodes:
        if isinstance(node.meta.get("val"), torch.Tensor):
            assert node.meta["val"].device.type == "cuda", node
            assert tuple(node.meta["val"].shape) == shapes[node.name]
    x = gm.graph.find_nodes(op="placeholder")[0].meta["val"]
    assert isinstance(x.shape[0], torch.SymInt)


def test_bad_device_lists_are_refused():
    model, x = MLP().eval(), torch.randn(2, 32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0': torch sees no CUDA GPU here"):
            graphopt.optimize(model, (x,), devices=["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="accepted device kinds are 'cpu' and 'cuda'"):
        graphopt.optimize(model, (x,), devices=["cpu", "meta"])
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        graphopt.optimize(model, (x,), devices=["cpu", "gpu0"])
    with pytest.raises(ValueError, match="fewer than the 64 devices"):
        graphopt.optimize(model, (x,), devices=["cpu"] * 64)
    with pytest.raises(ValueError, match="devices"):
        graphopt.optimize(model, (x,), devices="cpu")


def _two_gloo_processes(tmp_path: Path, body: str, processes: int = 2) -> Path:
    """Run `body` in each of 2 (or `processes`) processes of a gloo group, after it set up
    `rank`, `world`, `model` (ResidualCNN, eval), a batch `x` of 8, labels `y` and `out`
    (tmp_path/out.pt)."""
    worker = textwrap.indent(textwrap.dedent(body), " " * 4)
    script = tmp_path / "two.py"
    script.write_text(
        f"""import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT)!r})
import graphopt.distributed as gd
from tests.models import ResidualCNN

def worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
{worker}
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.multiprocessing.spawn(
        worker, args=({processes}, "file://{tmp_path}/store", {str(tmp_path / "out.pt")!r}),
        nprocs={processes},
    )
"""
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "out.pt"


def test_two_process_gloo_pipeline_matches_eager(tmp_path):
    """Each process runs one stage (torch.distributed.pipelining, GPipe, 4 microbatches);
    the last rank's output equals the model's."""
    out = _two_gloo_processes(
        tmp_path,
        """
        run = gd.pipeline(model, (x[:2],), n_microbatches=4)
        got = run(x)
        if rank == world - 1:
            with torch.no_grad():
                torch.save((got, model(x), run.plan.imbalance), out)
        else:
            assert got is None
        """,
    )
    got, want, imbalance = torch.load(out)
    assert_same_outputs(want, got)
    assert imbalance < 1.5


def _stages_in_one_process(assignment: dict[str, int]) -> tuple[list, list[torch.Tensor]]:
    """The gloo workers' model, batch and cuts in one process: its two trainable stages and the
    cross-entropy of each 2-row microbatch through them chained."""
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    captured, gm, plan = plan_for(model, (x[:2],), 2)
    stages = split_stages(gm, _replan(plan, assignment))
    for stage in stages:
        make_trainable(stage)
    losses = []
    for xs, ys in zip(x.split(2), y.split(2)):
        out = StagedModule(stages, ["cpu", "cpu"])(*captured.flat_inputs((xs,)))[0]
        losses.append(torch.nn.functional.cross_entropy(out, ys))
    return stages, losses


def test_two_process_1f1b_training_step_matches_one_process(tmp_path):
    """One training step (1F1B, 4 microbatches, cross-entropy) over 2 gloo processes: the loss
    and every stage parameter's gradient equal those of the same stages chained in one process
    (the mean of the microbatch losses, backward)."""
    out = _two_gloo_processes(
        tmp_path,
        """
        run = gd.pipeline(
            model, (x[:2],), n_microbatches=4, loss_fn=torch.nn.functional.cross_entropy
        )
        loss = run(x, target=y) if rank == world - 1 else run(x)
        grads = {n: p.grad.clone() for n, p in run.module.named_parameters()}
        torch.save((run.plan.assignment, grads, loss), f"{out}.{rank}")
        """,
    )
    assignment, grads0, none = torch.load(f"{out}.0")
    _, grads1, loss = torch.load(f"{out}.1")
    assert none is None and grads0 and grads1

    stages, losses = _stages_in_one_process(assignment)
    want = torch.stack(losses).mean()
    want.backward()
    assert_same_outputs(want.detach(), loss)
    for stage, got in zip(stages, (grads0, grads1)):
        expected = {n: p.grad for n, p in stage.named_parameters()}
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_two_stages_times_two_replicas_train_as_one_process(tmp_path):
    """2-D parallelism on 4 gloo processes: 2 pipeline stages x 2 data-parallel replicas
    (`replicas=2`), each replica on its half of the batch; after the step every rank's stage
    gradients equal those of the same stages chained in one process on the whole batch."""
    out = _two_gloo_processes(
        tmp_path,
        """
        run = gd.pipeline(
            model, (x[:2],), n_microbatches=2, loss_fn=torch.nn.functional.cross_entropy,
            replicas=2,
        )
        replica, stage = divmod(rank, 2)
        mine = slice(4 * replica, 4 * replica + 4)
        loss = run(x[mine], target=y[mine]) if stage == 1 else run(x[mine])
        grads = {n: p.grad.clone() for n, p in run.module.named_parameters()}
        torch.save((run.plan.assignment, stage, grads, loss), f"{out}.{rank}")
        """,
        processes=4,
    )
    results = [torch.load(f"{out}.{rank}") for rank in range(4)]
    assignment = results[0][0]
    assert all(r[0] == assignment for r in results)  # every replica cut the same way
    stages, losses = _stages_in_one_process(assignment)
    torch.stack(losses).mean().backward()
    for _, stage_index, grads, _ in results:
        expected = {n: p.grad for n, p in stages[stage_index].named_parameters()}
        assert expected.keys() == grads.keys()
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    replica_losses = [results[r][3] for r in (1, 3)]  # each replica's last stage
    want = [torch.stack(losses[:2]).mean(), torch.stack(losses[2:]).mean()]
    assert_same_outputs(tuple(w.detach() for w in want), tuple(replica_losses))


def test_training_graphs_run_whole_with_a_warning():
    model, x = MLP().eval(), torch.randn(4, 32)  # (eval: no dropout; weights still train)
    compiled = torch.compile(model, backend="graphopt", options={"devices": ["cpu", "cpu"]})
    out = compiled(x)
    out.sum().backward()
    assert_same_outputs(model(x), out)
    warnings = [w for r in graphopt.reports() for w in r.warnings]
    assert any("pipeline stages are for inference" in w for w in warnings), warnings
