"""Pipeline stages by the cost model (passes/partition_stages.py) and their runtimes
(graphopt/distributed.py): in one process and over 2 gloo processes."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphopt
from benchmarks.models import ResNet18
from graphopt.distributed import StagedModule, plan_for
from graphopt.passes.partition_stages import DeviceSpec, cost_graph, plan_stages, split_stages
from graphopt.testing import assert_same_outputs
from tests.models import MLP, ResidualCNN

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


def test_bad_device_lists_are_refused():
    model, x = MLP().eval(), torch.randn(2, 32)
    with pytest.raises(NotImplementedError, match="only CPU stages"):
        graphopt.optimize(model, (x,), devices=["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="fewer than the 64 devices"):
        graphopt.optimize(model, (x,), devices=["cpu"] * 64)
    with pytest.raises(ValueError, match="devices"):
        graphopt.optimize(model, (x,), devices="cpu")


def test_two_process_gloo_pipeline_matches_eager(tmp_path):
    """Each process runs one stage (torch.distributed.pipelining, GPipe, 4 microbatches);
    the last rank's output equals the model's."""
    code = textwrap.dedent(
        f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(ROOT)!r})
        import graphopt.distributed as gd
        from tests.models import ResidualCNN

        def worker(rank, world, init, out):
            dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
            torch.set_num_threads(1)
            torch.manual_seed(0)
            model = ResidualCNN().eval()
            x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            run = gd.pipeline(model, (x[:2],), n_microbatches=4)
            got = run(x)
            if rank == world - 1:
                with torch.no_grad():
                    torch.save((got, model(x), run.plan.imbalance), out)
            else:
                assert got is None
            dist.destroy_process_group()

        if __name__ == "__main__":
            init = "file://{tmp_path}/store"
            torch.multiprocessing.spawn(worker, args=(2, init, {str(tmp_path / "out.pt")!r}),
                                        nprocs=2)
        """
    )
    script = tmp_path / "pipe.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got, want, imbalance = torch.load(tmp_path / "out.pt")
    assert_same_outputs(want, got)
    assert imbalance < 1.5


def test_training_graphs_run_whole_with_a_warning():
    model, x = MLP().eval(), torch.randn(4, 32)  # (eval: no dropout; weights still train)
    compiled = torch.compile(model, backend="graphopt", options={"devices": ["cpu", "cpu"]})
    out = compiled(x)
    out.sum().backward()
    assert_same_outputs(model(x), out)
    warnings = [w for r in graphopt.reports() for w in r.warnings]
    assert any("pipeline stages are for inference" in w for w in warnings), warnings
