"""graphopt.plan: the model's arithmetic, the choice of layout, the FLOP count and the probe
(its step-time predictions against measured DDP steps: benchmarks/plan.py, RESULTS-plan.md)."""

from __future__ import annotations

import argparse

import pytest
import torch

from graphopt import cli
from graphopt.plan import DeviceKind, Workload, layouts_for, plan, probe, workload

WORK = Workload(flops=1e12, gradient_bytes=10**9, batch=8)
DEVICE = DeviceKind("x", flops_per_s=1e12, memory_bytes=1e10, link_bytes_per_s=1e9,
                    price_per_hour=3.6, count=4)  # fmt: skip


def _layout(replicas: int, stages: int):
    return next(
        x for x in layouts_for(WORK, DEVICE) if (x.replicas, x.stages) == (replicas, stages)
    )


def test_data_parallel_step_is_compute_plus_a_ring_all_reduce():
    one, two = _layout(1, 1), _layout(2, 1)
    assert (one.compute_s, one.allreduce_s, one.samples_per_s) == (1.0, 0.0, 8.0)
    assert two.compute_s == 1.0 and two.allreduce_s == pytest.approx(1.0)  # 2 (r-1)/r x 1 GB
    assert two.samples_per_s == pytest.approx(8.0)  # twice the samples in twice the time
    four = _layout(4, 1)
    assert four.wire_bytes == pytest.approx(1.5e9) and four.allreduce_s == pytest.approx(1.5)
    assert four.cost_per_million == pytest.approx(4 * 3.6 / 3600 / four.samples_per_s * 1e6)


def test_a_ring_over_machines_runs_at_the_network_and_pays_latency_per_bucket():
    cluster = DeviceKind("g", 1e12, 1e10, link_bytes_per_s=4e9, count=8, per_node=4,
                         node_link_bytes_per_s=1e9, latency_s=1e-3)  # fmt: skip
    by = {(x.replicas, x.stages): x for x in layouts_for(WORK, cluster, bucket_bytes=250e6)}
    # 1 GB in 4 buckets: within a machine 2 (r-1)/r GB at 4 GB/s; over two at 1 GB/s
    assert by[4, 1].allreduce_s == pytest.approx(1.5 / 4 + 2 * 3 * 1e-3 * 4)
    assert by[8, 1].allreduce_s == pytest.approx(1.75 / 1 + 2 * 7 * 1e-3 * 4)
    assert by[4, 2].allreduce_s == pytest.approx(0.75 / 1 + 2 * 3 * 1e-3 * 2)  # 8 devices


def test_overlap_hides_the_all_reduce_behind_the_backward_but_for_the_last_bucket():
    work = Workload(flops=3e12, gradient_bytes=10**9, batch=8, forward_flops=1e12)
    gpu = DeviceKind("g", 1e12, 1e10, link_bytes_per_s=1e9, count=4, overlap=True)
    by = {(x.replicas, x.stages): x for x in layouts_for(work, gpu, bucket_bytes=250e6)}
    assert by[2, 1].allreduce_s == pytest.approx(1.0 / 4)  # 1 s, under a 2 s backward
    slow = DeviceKind("s", 1e12, 1e10, link_bytes_per_s=0.25e9, count=4, overlap=True)
    two = next(x for x in layouts_for(work, slow, bucket_bytes=250e6) if x.replicas == 2)
    assert two.allreduce_s == pytest.approx(4.0 - 2.0)  # 4 s, 2 of them behind the backward
    assert Workload(3e12, 1, 1).backward_share == pytest.approx(2 / 3)


def test_pipeline_stages_split_compute_and_memory_and_pay_the_bubble():
    two = _layout(1, 2)  # 4 microbatches: (4 + 2 - 1) / 4 of half the compute
    assert two.compute_s == pytest.approx(0.5 * 5 / 4) and two.microbatches == 4
    assert two.memory_bytes == pytest.approx(1e9 / 2 * 3)  # weights, grads, 1 optimizer state
    small = DeviceKind("small", 1e12, 2e9, 1e9, 1.0, 2)
    fits = {(x.replicas, x.stages): x.fits for x in layouts_for(WORK, small)}
    assert fits == {(1, 1): False, (2, 1): False, (1, 2): True}  # 3 GB, or 1.5 GB a device


def test_the_cheapest_layout_that_meets_the_goal_comes_first():
    model, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    fast = DeviceKind("fast", 1e9, 1e9, 1e9, price_per_hour=10.0, count=2)
    slow = DeviceKind("slow", 1e8, 1e9, 1e9, price_per_hour=0.5, count=4)
    result = plan(model, (x,), devices=[fast, slow], goal_samples_per_s=5e4)
    meets = [x for x in result.layouts if x.fits and x.samples_per_s >= 5e4]
    assert result.best is meets[0] and result.best.cost_per_million == min(
        x.cost_per_million for x in meets
    )
    assert result.layouts[: len(meets)] == meets  # the rest after them
    assert "best" in str(result) and "below the goal" in str(result)
    assert plan(model, (x,), devices=[slow], goal_samples_per_s=1e12).best is None
    with pytest.raises(ValueError, match="goal_samples_per_s must be > 0"):
        plan(model, (x,), devices=[slow], goal_samples_per_s=0)


def test_workload_counts_forward_and_backward_flops_and_gradient_bytes():
    model, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    work = workload(model, (x,))
    # forward 2*8*64*32; backward the weight's gradient (the input needs none)
    assert work.flops == 2 * (2 * 8 * 64 * 32) and work.forward_flops == 2 * 8 * 64 * 32
    assert work.gradient_bytes == (64 * 32 + 32) * 4 and work.batch == 8
    assert model.weight.grad is None  # counting leaves no gradients behind


def test_probe_measures_this_cpu_and_its_all_reduce_and_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256)).train()
    x = torch.randn(64, 256) * 3 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    device = probe(model, (x,), steps=2)
    assert device.name == "cpu-1-thread" and device.count >= 1
    assert 1e8 < device.flops_per_s < 1e13 and 1e7 < device.link_bytes_per_s < 1e12
    after = model.state_dict()  # BatchNorm's statistics and the weights, untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_bad_device_kinds_are_named():
    with pytest.raises(ValueError, match="'x': flops_per_s must be > 0"):
        DeviceKind("x", 0, 1, 1)


def test_cli_plans_declared_devices(tmp_path, capsys):
    factory = tmp_path / "m.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(16, 4)\n")
    code = cli.main(
        ["plan", f"{factory}:make", "--input", "8,16", "--goal", "100",
         "--device", "a100,150e12,80e9,100e9,2.0,8"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "a100" in out and "best" in out
    assert cli.main(["plan", f"{factory}:make", "--input", "8,16", "--option", "x=1"]) == 2
    cluster = cli._device(
        "p100,5e12,16e9,10e9,1.5,64,per_node=4,node_link_bytes_per_s=3e9,overlap=1"
    )
    assert (cluster.per_node, cluster.node_link_bytes_per_s, cluster.overlap) == (4, 3e9, True)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown key 'nodes'"):
        cli._device("p100,5e12,16e9,10e9,1.5,64,nodes=4")
    with pytest.raises(argparse.ArgumentTypeError, match="overlap must be 0 or 1, got 'yes'"):
        cli._device("p100,5e12,16e9,10e9,1.5,64,overlap=yes")
    with pytest.raises(argparse.ArgumentTypeError, match="needs node_link_bytes_per_s"):
        cli._device("p100,5e12,16e9,10e9,1.5,64,per_node=4")
