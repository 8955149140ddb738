"""Default CPU schedules: what an `llvm` kernel gets when the tuning database has none for it.

TVM 0.27 schedules nothing on CPU by default (`dlight.cpu` has GEMV and softmax/norm-style
reductions only), so a conv or a matmul compiles to one thread running a scalar loop nest.
`cpu_rules(target)` is what `build.schedule_relax` applies; the first rule that takes a
kernel schedules it:

- `TiledReduction`: a kernel whose one reduction block sums products (conv2d, dense, matmul,
  batch_matmul), with spatial producers/consumers (padding, bias, activation). The output is
  cut into register tiles of up to 12 accumulator vectors: the whole reduction runs per tile
  in a local accumulator, the elementwise tail is applied as the tile is written out, and the
  tiles run in parallel. Which axis is the vector:
  - the reduction multiplies an activation by a constant weight (convs and dense layers;
    `build.optimize_relax` marks constants layout-free): the output channels, one or two
    vectors, with an activation axis (a conv's output column, a dense layer's row) unrolled,
    each activation element broadcast; the weight is packed at compile time so that each
    vector is one contiguous load (MetaSchedule's RewriteLayout; `build.schedule_relax`
    runs the repacking on the constants). Strided convs and narrow outputs (7x7) tile as
    well as any.
  - otherwise (attention's batch_matmul, a weight whose output channels are not whole
    vectors): the output's last axis is one vector, and a second axis the vector operand
    does not index is unrolled, so each loaded vector feeds up to 12 accumulators.
  Depthwise convs are claimed and left as written (see `MIN_REDUCTION`).
- dlight's `cpu.GEMV` (matrix-vector products whose matrix is strided along the output).
- `Injective`: kernels that are purely elementwise or layout changes: parallel, and
  vectorized along the innermost axis.

A rule that raises a ScheduleError on a kernel leaves it to the next rule; a kernel no rule
takes compiles as written (pooling, whose plain loops LLVM vectorizes well; softmax and layer
norm: see `DEFAULT_CPU_RULES`). Tile sizes are
divisors of the extents (no predicated tails) chosen from the target's vector width, not
measured: `graphopt.tune` searches for better ones.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    get_reduction_blocks,
    get_root_block,
    get_sblock_info,
)
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

log = logging.getLogger(__name__)

# Accumulator registers a tile may use (x86-64 AVX2 and aarch64 NEON have 16 and 32 vector
# registers; the loaded vector and the broadcast operand need a few of the rest): tiles of one
# vector by up to 12 rows keep more independent accumulators in flight than two vectors by 4.
ACCUMULATOR_REGISTERS = 12
TILE_VECTORS = 1  # vectors along the output's last axis per tile (maybe one partial vector)
# Most vectors of output channels per packed-weight tile (`_packed_tile_vectors`); each vector
# is its own unrolled op (a single wider op is split badly by LLVM). Three suit BERT's dense
# layers and MobileNetV2's convs; ResNet-18's convs pick 2 either way (`python -m
# benchmarks.run` times the models with these schedules).
PACKED_TILE_VECTORS = 3
# A kernel with no axis to unroll (depthwise conv) is tiled only when each output sums at
# least this many products: MobileNetV2's 3x3 depthwise convs ran 2-5x slower tiled than
# LLVM's own vectorization of the plain loops, and 1.2-2x slower with those loops run in
# parallel (dlight's cpu.Reduction, or our outer loops parallel): they stay as written.
MIN_REDUCTION = 64
# Parallel loops get at least this many iterations to share out, when the kernel has them.
PARALLEL_CHUNKS = 256
PARALLEL_MIN_WORK = 1 << 14


def _vector_lanes(target: Target, dtype_bits: int) -> int:
    """SIMD lanes of `dtype_bits`-wide elements. LLVM's reported width is 512 for any x86
    CPU (AVX2-only ones included), so x86 widths come from the CPU's features."""
    if target_has_features("avx512f", target):
        bits = 512
    elif target_has_features("avx", target):
        bits = 256
    else:
        bits = llvm_get_vector_width(target)
        bits = bits if 0 < bits < 512 else 128  # aarch64 NEON, x86 SSE: 128
    return max(bits // dtype_bits, 2)


def _divisor_at_most(extent: int, limit: int, multiple_of: int = 1) -> int:
    """The largest divisor of `extent` that is <= `limit`, preferring multiples of
    `multiple_of`."""
    divisors = [d for d in range(1, min(extent, limit) + 1) if extent % d == 0]
    preferred = [d for d in divisors if d % multiple_of == 0]
    return max(preferred or divisors)


def _static(extent: tirx.PrimExpr | int) -> int | None:
    if isinstance(extent, int):
        return extent
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _vars_in(expr: tirx.PrimExpr) -> list[tirx.Var]:
    return list(tirx.analysis.undefined_vars(expr))


def _uses(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in _vars_in(expr))


class _Rule(CPUScheduleRule):
    """A CPU rule whose `schedule` may give up by returning None or raising ScheduleError (or
    AssertionError, from dlight's inlining helpers)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(s_tir.Schedule(func), target)
        except (s_tir.ScheduleError, AssertionError) as err:  # dlight's helpers assert
            log.debug("%s did not schedule a kernel: %s", type(self).__name__, err)
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class TiledReduction(_Rule):
    """Register-tiled, parallel, vectorized schedule of a kernel with one reduction block."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        """The packed-weight tile where the kernel has one, else (or if packing fails) the
        tile along the output's last axis."""
        try:
            tiled = self._tile(sch.copy(), target, pack=True)
            if tiled is not None:
                return tiled
        except (s_tir.ScheduleError, AssertionError) as err:
            log.debug("packing a kernel's weight failed, tiling it unpacked: %s", err)
        return self._tile(sch, target, pack=False)

    def _tile(self, sch: s_tir.Schedule, target: Target, pack: bool) -> s_tir.Schedule | None:
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        if len(stmt.writes) != 1 or len(stmt.reads) < 2:
            return None  # not a sum of products: pooling vectorizes well enough in LLVM
        info = get_sblock_info(sch, main)
        if len(info.iters) != len(stmt.iter_vars) or any(it.kind == "O" for it in info.iters):
            return None
        extents = [_static(it.dom) for it in info.iters]
        if any(e is None for e in extents):
            return None  # symbolic sizes: left to the next rules, or as written
        spatial = [i for i, it in enumerate(info.iters) if it.kind == "S"]
        reduce = [i for i, it in enumerate(info.iters) if it.kind == "R"]
        lanes = _vector_lanes(target, stmt.writes[0].source.dtype.bits)
        reduction_size = math.prod(extents[i] for i in reduce)
        packed = _packed_weight_axes(sch, stmt, info, spatial, extents, lanes) if pack else None
        if packed is not None:
            # The weight is a constant (layout-free): its axis the activation does not index
            # is the vector, the weight packed so each vector is one contiguous load.
            vec, unroll = packed
            vec_inner = lanes * _packed_tile_vectors(
                extents[vec] // lanes, 1 if unroll is None else extents[unroll]
            )
        else:
            # The vectorized axis: the spatial iterator that indexes the output's last dim.
            out_last = stmt.writes[0].region[-1].min
            vec = next((i for i in spatial if info.iters[i].var.same_as(out_last)), None)
            if vec is None or extents[vec] < 2:
                return None
            vec_inner = _divisor_at_most(extents[vec], TILE_VECTORS * lanes)

            # The unrolled axis: a spatial iterator the vector operands (reads whose last
            # index uses the vectorized iterator) do not index, so one vector load serves each
            # of its iterations; the largest such one.
            vec_var = info.iters[vec].var
            vector_reads = [r for r in stmt.reads if _uses(r.region[-1].min, vec_var)]
            if not vector_reads:
                return None  # every operand strided along the output's last axis: GEMV's case
            used = [v for read in vector_reads for rng in read.region for v in _vars_in(rng.min)]
            candidates = [
                i
                for i in spatial
                if i != vec
                and extents[i] > 1
                and not any(v.same_as(info.iters[i].var) for v in used)
            ]
            unroll = max(candidates, key=lambda i: extents[i], default=None)
            if unroll is None and reduction_size < MIN_REDUCTION:
                # depthwise conv: kept as written (claimed, so the next rules leave it alone)
                return sch
        vectors = -(-vec_inner // lanes)
        unroll_inner = (
            _divisor_at_most(extents[unroll], max(ACCUMULATOR_REGISTERS // vectors, 1))
            if unroll is not None
            else 1
        )

        # An extent with no divisor near a vector (GPT-2's 50257-word head) would leave scalar
        # tiles or a predicated vector, both far slower: computed padded to whole vectors; the
        # padded copies of its operands and the trimmed copy of the output run
        # as their own parallel loops, and the elementwise tail stays with the trim.
        padded = 2 * vec_inner < lanes < extents[vec]
        if padded:
            sch.pad_einsum(main, [lanes if i == vec else 1 for i in range(len(extents))])
            info = get_sblock_info(sch, main)
            extents[vec] = _static(info.iters[vec].dom)
            vec_inner = lanes
            root = get_root_block(sch)
            others = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
            others.remove(sch.get(main).name_hint)

        producers = [] if padded else sch.get_producers(main)
        loops = [it.loop_rv for it in info.iters]
        vec_outer, vec_loop = sch.split(loops[vec], [None, vec_inner])
        outer = [loops[i] for i in spatial if i not in (vec, unroll)] + [vec_outer]
        inner = [vec_loop]
        if packed is not None and vec_inner > lanes:  # whole vectors, each its own op
            inner = list(sch.split(vec_loop, [None, lanes]))
        if unroll is not None:
            unroll_outer, unroll_loop = sch.split(loops[unroll], [None, unroll_inner])
            outer.append(unroll_outer)
            inner.insert(0, unroll_loop)
        reduce_loops = [loops[i] for i in reduce]
        sch.reorder(*outer, *reduce_loops, *inner)

        # Accumulate a tile locally; write it out (with the elementwise tail) per tile.
        tile = sch.fuse(*outer)
        local = sch.cache_write(main, 0, "local")
        if packed is not None:  # the accumulator tile with the vector axis innermost
            _move_dim_last(sch, main, _dim_of(stmt.writes[0], info.iters[vec].var))
        sch.reverse_compute_at(local, tile, preserve_unit_loops=True)
        if not padded:
            auto_inline_consumer_chain(sch, local)
        sch.parallel(tile)
        for loop in inner[:-1]:
            sch.unroll(loop)
        sch.vectorize(inner[-1])
        init = sch.decompose_reduction(main, reduce_loops[0])
        _vectorize_innermost(sch, init, lanes)
        _vectorize_innermost(sch, local, lanes)
        for producer in producers:  # padding: its own parallel loop nest
            _parallel_vectorized(sch, producer, lanes)
        for name in others if padded else ():
            _parallel_vectorized(sch, sch.get_sblock(name), lanes)
        if packed is not None and not _pack_weights(sch):
            return None
        return sch


def _packed_weight_axes(
    sch: s_tir.Schedule,
    stmt: s_tir.SBlock,
    info: Any,
    spatial: list[int],
    extents: list[int],
    lanes: int,
) -> tuple[int, int | None] | None:
    """(vector iterator, unrolled iterator or None) when the reduction multiplies one activation
    by one constant weight (a param in the function's `layout_free_buffers`, which
    `build.optimize_relax` marks): the vector is a weight axis the activation does not index
    (a conv's or a dense layer's output channels; whole vectors only), unrolled is an
    activation axis the weight does not index (the output's last axis if it is one: a conv's
    output column, a dense layer's row). None when the kernel is not of that form."""
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs else None
    if not free:
        return None
    buffers = [func.params[int(i)] for i in free]
    weights = [r for r in stmt.reads if any(r.source.same_as(b) for b in buffers)]
    others = [r for r in stmt.reads if not any(r.source.same_as(b) for b in buffers)]
    if len(weights) != 1 or len(others) != 1:
        return None

    def indexes(read: tirx.BufferRegion, i: int) -> bool:
        return any(_uses(rng.min, info.iters[i].var) for rng in read.region)

    vectors = [
        i
        for i in spatial
        if indexes(weights[0], i) and not indexes(others[0], i) and extents[i] % lanes == 0
    ]
    if not vectors:
        return None
    unrolls = [
        i
        for i in spatial
        if indexes(others[0], i) and not indexes(weights[0], i) and extents[i] > 1
    ]
    out_last = stmt.writes[0].region[-1].min
    last = [i for i in unrolls if info.iters[i].var.same_as(out_last)]
    unroll = last[0] if last else max(unrolls, key=lambda i: extents[i], default=None)
    return max(vectors, key=lambda i: extents[i]), unroll


def _packed_tile_vectors(vectors: int, rows: int) -> int:
    """Vectors per tile of a packed-weight kernel with `vectors` vectors along the output
    channels and `rows` iterations of the unrolled axis: the most accumulators (vectors x
    unrolled rows within `ACCUMULATOR_REGISTERS`), then the most vectors (fewer broadcasts
    per multiply-add)."""
    options = [v for v in range(1, PACKED_TILE_VECTORS + 1) if vectors % v == 0]
    return max(options, key=lambda v: (v * _divisor_at_most(rows, ACCUMULATOR_REGISTERS // v), v))


def _dim_of(region: tirx.BufferRegion, var: tirx.Var) -> int:
    """The dimension of `region` that `var` indexes."""
    return next(d for d, rng in enumerate(region.region) if _uses(rng.min, var))


def _move_dim_last(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, dim: int) -> None:
    """The buffer `block` writes, laid out with dimension `dim` innermost."""
    ndim = len(sch.get(block).writes[0].region)
    order = [d for d in range(ndim) if d != dim] + [dim]
    index_map = tirx.IndexMap.from_func(lambda *idx: [idx[d] for d in order], ndim=ndim)
    sch.transform_layout(block, ("write", 0), index_map)


def _pack_weights(sch: s_tir.Schedule) -> bool:
    """Each layout-free (constant) weight laid out in the order the schedule reads it
    (MetaSchedule's RewriteLayout: a preprocessing block that `build.schedule_relax`
    splits out and folds at compile time, so no call repacks it). False if it failed."""
    # marked as a postprocessing step in the trace, as MetaSchedule's own: the tuner's search
    # replays the trace without it and packs its candidates itself. (No TuneContext: its
    # constructor imports tvm.s_tir.tensor_intrin, 30-50 s here, and RewriteLayout needs none.)
    sch.enter_postproc()
    return bool(ms.postproc.RewriteLayout().apply(sch))


class Injective(_Rule):
    """Elementwise and layout kernels: each block's outer loops parallel, the innermost axis
    vectorized."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(info.is_injective() for info in infos):
            return None
        lanes = _vector_lanes(target, 32)
        for info in infos:
            _parallel_vectorized(sch, info.block_rv, lanes)
        return sch


def _vectorizable(block: s_tir.SBlock) -> bool:
    """False for a block that computes an `if_then_else` (padding: vectorized, both of its
    sides are loaded, and the side the condition guards may lie outside the buffer), or that
    touches a bool buffer (TVM 0.27's vectorized bool code fails LLVM's verifier, mixing
    <8 x i1> and <8 x i8>, or computes wrong values: found by tests/backends/tvm)."""
    regions = [*block.reads, *block.writes]
    if any(str(region.source.dtype) == "bool" for region in regions):
        return False
    return "if_then_else" not in str(block.body)


def _vectorize_innermost(
    sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int
) -> list[s_tir.schedule.LoopRV]:
    """The block's innermost loop vectorized, split first to a divisor <= 2 vectors when it
    is longer (only when its extent is static and the block is `_vectorizable`); the loops
    outside the vectorized one."""
    loops = sch.get_loops(block)
    extent = _static(sch.get(loops[-1]).extent) if loops else None
    if extent is None or extent < 2 or not _vectorizable(sch.get(block)):
        return loops
    if extent > 2 * lanes:
        outer, vec = sch.split(loops[-1], [None, _divisor_at_most(extent, 2 * lanes, lanes)])
        sch.vectorize(vec)
        return [*loops[:-1], outer]
    sch.vectorize(loops[-1])
    return loops[:-1]


def _parallel_vectorized(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, lanes: int):
    """`_vectorize_innermost`, then the loops outside it fused and parallel from the
    outermost until there are `PARALLEL_CHUNKS` iterations, the rest nested (a fully fused
    loop divides its index back per element). Kernels of fewer than `PARALLEL_MIN_WORK`
    elements stay serial: starting the threads costs more."""
    loops = _vectorize_innermost(sch, block, lanes)
    extents = [_static(sch.get(loop).extent) for loop in loops]
    if not loops or (None not in extents and math.prod(extents) < PARALLEL_MIN_WORK):
        return
    count, chunks = 0, 1
    for e in extents:
        count += 1
        if e is None:
            break
        chunks *= e
        if chunks >= PARALLEL_CHUNKS:
            break
    outer = loops[:count]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


# dlight's cpu.Reduction is left out: it computed NaN for aten._safe_softmax's fully masked
# rows (tests/opinfo), and it did not speed up BERT's softmax or layer norm.
DEFAULT_CPU_RULES = (
    TiledReduction(),
    dlight.cpu.GEMV(),
    Injective(),
)


def cpu_rules(target: Target) -> tuple[dlight.ScheduleRule, ...]:
    """`DEFAULT_CPU_RULES`, or none for an SVE target: LLVM vectorizes the plain loops with
    scalable vectors itself, and these rules' fixed 128-bit vectors would replace that
    (a scalable-vector schedule is not written yet)."""
    return () if target_has_features("sve", target) else DEFAULT_CPU_RULES


def default_schedule(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    """The schedule (with its trace) the first of `cpu_rules(target)` that takes `func`
    gives it, or None; what `graphopt.tune` times first and records for each kernel."""
    for rule in cpu_rules(target):
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch
    return None
