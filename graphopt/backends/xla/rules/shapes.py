"""Shape and data-movement rules: views, permutes, concatenation, slicing, indexing, gathers,
scatters (index_put, scatter, slice/select_scatter), sort and searchsorted, casts, constants
made in the graph (full, arange, empty) and size arithmetic."""

from __future__ import annotations

import operator

import jax.numpy as jnp
import torch
import torch.fx
from jax import lax

from graphopt.backends.registry import (
    integer_size,
    same_device_strided,
    static_arange,
    static_scalars,
)
from graphopt.backends.xla.rules.common import XLA, _axis, _cast, _is_float, _scalar, rule
from graphopt.passes.base import named_args as args

aten = torch.ops.aten


def _reshape_to_output(ctx, node):
    """view / reshape / squeeze / unsqueeze: the traced output shape says it all."""
    return jnp.reshape(ctx[node.args[0]], ctx.shape(node))


rule(
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.view_copy.default,
)(_reshape_to_output)


@rule(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
def identity(ctx, node):
    """Arrays are immutable in JAX: a copy is the value itself."""
    return ctx[node.args[0]]


@XLA.rule(aten._assert_tensor_metadata.default)  # returns nothing, so it has no meta["val"]
def assert_tensor_metadata(ctx, node):
    """Checked when torch traced the graph; nothing to compute."""
    return None


@rule(aten.permute.default, aten.permute_copy.default)
def permute(ctx, node):
    x = ctx[node.args[0]]
    return jnp.transpose(x, [_axis(d, x.ndim) for d in node.args[1]])


@rule(aten.t.default)
def t(ctx, node):
    x = ctx[node.args[0]]
    return x.T if x.ndim == 2 else x


@rule(aten.transpose.int)
def transpose(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim < 2:
        return x
    return jnp.swapaxes(x, _axis(a["dim0"], x.ndim), _axis(a["dim1"], x.ndim))


@rule(aten.expand.default)
def expand(ctx, node):
    return jnp.broadcast_to(ctx[node.args[0]], ctx.shape(node))


@rule(aten.flip.default)
def flip(ctx, node):
    x = ctx[node.args[0]]
    return jnp.flip(x, [_axis(d, x.ndim) for d in node.args[1]]) if x.ndim else x


@rule(aten.roll.default)
def roll(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    dims = list(a["dims"])
    if not dims:
        return jnp.roll(x.reshape(-1), a["shifts"][0]).reshape(x.shape)
    return jnp.roll(x, a["shifts"], [_axis(d, x.ndim) for d in dims])


@rule(aten.repeat.default)
def repeat(ctx, node):
    x = ctx[node.args[0]]
    reps = ctx[node.args[1]]
    x = x.reshape((1,) * (len(reps) - x.ndim) + x.shape)
    return jnp.tile(x, reps)


def _cat_check(node, cfg):
    if any(not isinstance(t, torch.fx.Node) for t in node.args[0]):
        return "cat of a non-tensor"
    return None


@rule(aten.cat.default, check=_cat_check)
def cat(ctx, node):
    """torch skips 1-d empty tensors in cat (legacy); the rest in the output dtype."""
    a = args(node)
    dtype = ctx.dtype(node)
    parts = [
        _cast(ctx[t], dtype)
        for t in a["tensors"]
        if not (t.meta["val"].dim() == 1 and t.meta["val"].shape[0] == 0)
    ]
    ndim = ctx.ndim(node)
    return jnp.concatenate(parts, axis=_axis(a["dim"], ndim)) if parts else jnp.zeros((0,), dtype)


def _static_slice_args(node, cfg):
    for key in ("start", "end", "index"):
        value = args(node).get(key)
        if isinstance(value, torch.fx.Node | torch.SymInt):
            return f"symbolic slice {key}"
    if args(node).get("step", 1) <= 0:
        return "non-positive slice step"
    return None


@rule(aten.slice.Tensor, check=_static_slice_args)
def slice_(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], x.ndim)
    index = [slice(None)] * x.ndim
    index[axis] = slice(a["start"], a["end"], a["step"])
    return x[tuple(index)]


@rule(aten.select.int, check=_static_slice_args)
def select(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], x.ndim)
    index = a["index"]
    return lax.index_in_dim(x, index + x.shape[axis] if index < 0 else index, axis, False)


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def split(ctx, node):
    """One slice per piece, sizes from the traced outputs."""
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], x.ndim)
    pieces, begin = [], 0
    for piece in ctx.val(node):
        length = ctx.dim(piece.shape[axis])
        pieces.append(lax.slice_in_dim(x, begin, begin + length, axis=axis))
        begin = begin + length
    return tuple(pieces)


@rule(operator.getitem, check=lambda node, cfg: XLA.unsupported_reason(node.args[0], cfg))
def getitem(ctx, node):
    """Output i of a multi-output op (a Python tuple of arrays)."""
    source, index = ctx[node.args[0]], node.args[1]
    if source[index] is None and node.users:
        raise ValueError(f"output {index} of {node.args[0].name} is not lowered")
    return source[index]


@rule(
    aten.sym_size.int,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    check=integer_size,
)
def sym_size(ctx, node):
    """Sizes and size arithmetic (s0 * 4), read from the traced value."""
    return ctx.dim(ctx.val(node))


@rule(aten._to_copy.default, check=same_device_strided)
def to_copy(ctx, node):
    return _cast(ctx[node.args[0]], ctx.dtype(node))


@rule(aten.full.default, aten.full_like.default, check=static_scalars)
def full(ctx, node):
    return jnp.broadcast_to(_scalar(args(node)["fill_value"], ctx.dtype(node)), ctx.shape(node))


@rule(aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default)
def constant_like(ctx, node):
    value = 1 if node.target is aten.ones_like.default else 0  # empty: any value will do
    return jnp.full(ctx.shape(node), value, ctx.dtype(node))


@rule(aten.scalar_tensor.default, check=static_scalars)
def scalar_tensor(ctx, node):
    return _scalar(args(node)["s"], ctx.dtype(node))


@rule(aten.arange.default, aten.arange.start, aten.arange.start_step, check=static_arange)
def arange(ctx, node):
    """start, step static; the length is the traced one (end may be a size expression).

    As torch's CPU kernel: start + i * step in the accumulating type, which for an integer
    dtype is the dtype itself, the float start and step truncated (arange(0.1, -7.9, -4.0) as
    int64 is [0, -4], not [0, -3]); float64 for float32/64, float32 for half types."""
    a = args(node)
    start, step = a.get("start", 0), a.get("step", 1)
    dtype = ctx.dtype(node)
    (length,) = ctx.shape(node)
    if not _is_float(dtype):
        return int(start) + int(step) * lax.iota(dtype, length)
    acc = jnp.float32 if jnp.finfo(dtype).bits < 32 else jnp.float64
    return (start + step * lax.iota(acc, length)).astype(dtype)


@rule(aten.constant_pad_nd.default, check=static_scalars)
def constant_pad_nd(ctx, node):
    """pad = (last dim's left, right, the dim before's left, right, ...); negative crops."""
    a = args(node)
    x = ctx[a["input"]]
    pad = list(a["pad"])
    config = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        config[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(a["value"], x.dtype), config)


@rule(aten.index_select.default)
def index_select(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    index = ctx[a["index"]].reshape(-1)
    return jnp.take(x, index, axis=_axis(a["dim"], x.ndim)) if x.ndim else x


@rule(aten.embedding.default)
def embedding(ctx, node):
    a = args(node)
    return jnp.take(ctx[a["weight"]], ctx[a["indices"]], axis=0)


@rule(aten.gather.default)
def gather(ctx, node):
    """input's other dims cropped to the index's sizes (torch's gather allows a smaller index)."""
    a = args(node)
    x, index = ctx[a["input"]], ctx[a["index"]]
    if any(isinstance(d, int) and d == 0 for d in index.shape):  # empty: of any rank
        return jnp.zeros(index.shape, x.dtype)
    if x.ndim == 0:  # a 0-d input's index is 0 (0-d or 1-d)
        return jnp.broadcast_to(x, index.shape)
    axis = _axis(a["dim"], x.ndim)
    crop = tuple(slice(None) if d == axis else slice(0, index.shape[d]) for d in range(x.ndim))
    return jnp.take_along_axis(x[crop], index, axis=axis)


def _index_check(node, cfg):
    for index in args(node)["indices"]:
        if index is not None and index.meta["val"].dtype in (torch.bool, torch.uint8):
            return "boolean mask index (a size known only at run time)"
    return None


def _index_put_check(node, cfg):
    a = args(node)
    if a["accumulate"] and a["input"].meta["val"].dtype == torch.bool:
        return "index_put accumulating into bool"
    return _index_check(node, cfg)


@rule(aten.index.Tensor, check=_index_check)
def index(ctx, node):
    """Advanced indexing: numpy's rules are torch's (separated index tensors move to the front)."""
    a = args(node)
    x = ctx[a["input"]]
    key = tuple(slice(None) if i is None else ctx[i] for i in a["indices"])
    return x[key]


@rule(aten.index_put.default, check=_index_put_check)
def index_put(ctx, node):
    """input[indices] = values (accumulate: +=, duplicates summed), values broadcast as
    numpy's and torch's; a copy, as JAX arrays are immutable."""
    a = args(node)
    x = ctx[a["input"]]
    key = tuple(slice(None) if i is None else ctx[i] for i in a["indices"])
    values = _cast(ctx[a["values"]], x.dtype)
    return x.at[key].add(values) if a["accumulate"] else x.at[key].set(values)


def _scatter_key(index, axis: int) -> tuple:
    """The full index of scatter's element [i, j, ...] of `index`: index[i, j, ...] along
    `axis`, i, j, ... along the others."""
    return tuple(
        index if d == axis else lax.broadcasted_iota(index.dtype, index.shape, d)
        for d in range(index.ndim)
    )


def _scatter_operands(ctx, node):
    """(input, key, src cropped to the index's shape, and a function putting a 0-d input's
    result back to 0-d)."""
    a = args(node)
    x, index = ctx[a["input"]], ctx[a["index"]]
    shape = x.shape
    if x.ndim == 0:  # a 0-d scatter writes the one element
        x, index = x.reshape(1), index.reshape(1)
    axis = _axis(a["dim"], x.ndim)
    src = a.get("src", a.get("value"))
    if isinstance(src, torch.fx.Node):
        src = _cast(ctx[src], x.dtype)
        src = src.reshape(1) if src.ndim == 0 else src[tuple(slice(0, n) for n in index.shape)]
    else:
        src = _scalar(src, x.dtype)
    return x, _scatter_key(index, axis), src, lambda out: out.reshape(shape)


@rule(aten.scatter.src, aten.scatter.value, check=static_scalars)
def scatter(ctx, node):
    """out[..., index[i, j], ...] = src[i, j] (src cropped to the index's shape)."""
    x, key, src, restore = _scatter_operands(ctx, node)
    return restore(x.at[key].set(src))


@rule(aten.scatter_add.default)
def scatter_add(ctx, node):
    x, key, src, restore = _scatter_operands(ctx, node)
    return restore(_reduce_into(x, key, src, "sum", True))


def _scatter_reduce_check(node, cfg):
    reduce = args(node)["reduce"]
    if reduce not in ("sum", "prod", "mean", "amax", "amin"):
        return f"{node.target._overloadpacket.__name__} {reduce!r}"
    if reduce == "mean" and node.meta["val"].dtype == torch.bool:
        return "mean of bool"
    return None


def _reduce_into(x, key, src, reduce: str, include_self: bool):
    """x with each element x[key[i]] reduced with the src values sent to it, and with its own
    value when include_self; mean divides by their count (integers: floor division, as
    torch's), and an element nothing is sent to keeps its value."""
    if x.dtype == jnp.bool_:  # sum / amax are or, prod / amin and: as 0s and 1s
        out = _reduce_into(x.astype(jnp.int32), key, src.astype(jnp.int32), reduce, include_self)
        return out != 0
    if reduce == "mean":
        total = (x if include_self else x.at[key].set(0)).at[key].add(src)
        count = jnp.zeros(x.shape, x.dtype if _is_float(x.dtype) else jnp.int64)
        count = count.at[key].add(1) + (1 if include_self else 0)
        count = jnp.where(count == 0, jnp.ones_like(count), count)
        divide = jnp.true_divide if _is_float(x.dtype) else jnp.floor_divide
        return divide(total, count).astype(x.dtype)
    if _is_float(x.dtype):
        low, high = -jnp.inf, jnp.inf
    else:
        low, high = jnp.iinfo(x.dtype).min, jnp.iinfo(x.dtype).max
    identity = {"sum": 0, "prod": 1, "amax": low, "amin": high}[reduce]
    base = x if include_self else x.at[key].set(jnp.asarray(identity, x.dtype))
    ref = base.at[key]
    return {"sum": ref.add, "prod": ref.multiply, "amax": ref.max, "amin": ref.min}[reduce](src)


@rule(aten.scatter_reduce.two, check=_scatter_reduce_check)
def scatter_reduce(ctx, node):
    a = args(node)
    x, key, src, restore = _scatter_operands(ctx, node)
    return restore(_reduce_into(x, key, src, a["reduce"], a["include_self"]))


@rule(aten.index_reduce.default, check=_scatter_reduce_check)
def index_reduce(ctx, node):
    """input[..., index[i], ...] reduced with source[..., i, ...] along dim."""
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim == 0:
        x = x.reshape(1)
    key = [slice(None)] * x.ndim
    key[_axis(a["dim"], x.ndim)] = ctx[a["index"]].reshape(-1)
    src = _cast(ctx[a["source"]], x.dtype).reshape(x[tuple(key)].shape)
    out = _reduce_into(x, tuple(key), src, a["reduce"], a["include_self"])
    return out.reshape(ctx.shape(node))


@rule(aten.slice_scatter.default, check=_static_slice_args)
def slice_scatter(ctx, node):
    """input with input[..., start:end:step, ...] along dim replaced by src."""
    a = args(node)
    x = ctx[a["input"]]
    index = [slice(None)] * x.ndim
    index[_axis(a["dim"], x.ndim)] = slice(a["start"], a["end"], a["step"])
    return x.at[tuple(index)].set(_cast(ctx[a["src"]], x.dtype))


@rule(aten.select_scatter.default, check=_static_slice_args)
def select_scatter(ctx, node):
    """input with input[..., index, ...] along dim replaced by src."""
    a = args(node)
    x = ctx[a["input"]]
    index = [slice(None)] * x.ndim
    index[_axis(a["dim"], x.ndim)] = a["index"]
    return x.at[tuple(index)].set(_cast(ctx[a["src"]], x.dtype))


@rule(aten.diagonal_scatter.default)
def diagonal_scatter(ctx, node):
    """input with its diagonal (as `diagonal` takes it) replaced by src, whose last dim is the
    diagonal."""
    a = args(node)
    x = ctx[a["input"]]
    dim1, dim2, offset = _axis(a["dim1"], x.ndim), _axis(a["dim2"], x.ndim), a["offset"]
    front = jnp.moveaxis(x, (dim1, dim2), (0, 1))
    length = ctx.shape(a["src"])[-1]
    rows = jnp.arange(length, dtype=jnp.int64) + max(-offset, 0)
    cols = jnp.arange(length, dtype=jnp.int64) + max(offset, 0)
    src = jnp.moveaxis(_cast(ctx[a["src"]], x.dtype), -1, 0)
    return jnp.moveaxis(front.at[rows, cols].set(src), (0, 1), (dim1, dim2))


@rule(aten.diagonal.default)
def diagonal(ctx, node):
    """The diagonal (offset above, below if negative) of dims dim1, dim2, as the last dim."""
    a = args(node)
    x = ctx[a["input"]]
    dim1, dim2 = _axis(a["dim1"], x.ndim), _axis(a["dim2"], x.ndim)
    return jnp.diagonal(x, a["offset"], dim1, dim2)


@rule(aten.copy.default)
def copy(ctx, node):
    """src in input's dtype, broadcast to input's shape (input's values are not read)."""
    a = args(node)
    return jnp.broadcast_to(_cast(ctx[a["src"]], ctx.dtype(node)), ctx.shape(node))


@rule(aten.empty.memory_format, aten.empty_permuted.default)
def empty(ctx, node):
    """Uninitialized memory in torch: zeros will do."""
    return jnp.zeros(ctx.shape(node), ctx.dtype(node))


@rule(aten.unfold.default)
def unfold(ctx, node):
    """Windows of `size` every `step` along `dimension`: that dim becomes the window count,
    a last dim of `size` is added (a 0-d input is one window of size 1)."""
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim == 0:
        return x.reshape(ctx.shape(node))
    axis = _axis(a["dimension"], x.ndim)
    count, size = ctx.shape(node)[axis], a["size"]
    starts = jnp.arange(count, dtype=jnp.int64)[:, None] * a["step"]
    windows = jnp.take(x, starts + jnp.arange(size, dtype=jnp.int64)[None, :], axis=axis)
    return jnp.moveaxis(windows, axis + 1, -1)


def _sort_check(node, cfg):
    """An unstable sort's indices of equal values are whatever torch's kernel gives; its
    values are well defined."""
    if node.target is aten.sort.stable and args(node)["stable"]:
        return None
    for user in node.users:
        if user.target is not operator.getitem or (user.args[1] != 0 and user.users):
            return "indices of an unstable sort (ties are ordered by torch's kernel)"
    return None


@rule(aten.sort.default, aten.sort.stable, check=_sort_check)
def sort(ctx, node):
    """(values, indices) by a stable sort: NaN sorts above everything, as torch's."""
    a = args(node)
    x = ctx[a["input"]]
    if x.ndim == 0:
        return x, jnp.zeros((), jnp.int64)
    axis = _axis(a["dim"], x.ndim)
    order = jnp.argsort(x, axis=axis, stable=True, descending=bool(a["descending"]))
    return jnp.take_along_axis(x, order, axis=axis), order.astype(jnp.int64)


@rule(aten.narrow_copy.default, check=_static_slice_args)
def narrow_copy(ctx, node):
    a = args(node)
    x = ctx[a["input"]]
    axis = _axis(a["dim"], x.ndim)
    start = a["start"] + x.shape[axis] if a["start"] < 0 else a["start"]
    return lax.slice_in_dim(x, start, start + a["length"], axis=axis)


def _searchsorted_check(node, cfg):
    a = args(node)
    if a.get("sorter") is not None:
        return "searchsorted with a sorter"
    sequence = a["sorted_sequence" if "sorted_sequence" in a else "boundaries"]
    if isinstance(sequence.meta["val"].shape[-1], torch.SymInt):
        return "symbolic sequence length (the search's step count)"
    return None


def _insertion_points(seq, values, right: bool):
    """Per value, where torch's binary search over the last dim of `seq` (1-d: one sequence
    for all values) ends, step for step: its midpoints, and its test (the left side passes an
    element unless s >= v, the right unless s > v), so that NaNs, which no count of smaller
    elements places, land where torch's land."""
    length = seq.shape[-1]
    start = jnp.zeros(values.shape, jnp.int64)
    end = jnp.full(values.shape, length, jnp.int64)
    for _ in range(length.bit_length()):  # an empty sequence: 0 steps, every point is 0
        mid = start + (end - start) // 2
        at = jnp.minimum(mid, length - 1)
        if seq.ndim == 1:
            pivot = jnp.take(seq, at)
        else:
            pivot = jnp.take_along_axis(seq, at, axis=-1)
        past = (start < end) & ~((pivot > values) if right else (pivot >= values))
        stop = (start < end) & ~past
        start, end = jnp.where(past, mid + 1, start), jnp.where(stop, mid, end)
    return start


@rule(aten.searchsorted.Tensor, check=_searchsorted_check)
def searchsorted(ctx, node):
    a = args(node)
    right = a["side"] == "right" if a["side"] is not None else bool(a["right"])
    dtype = torch.result_type(ctx.val(a["sorted_sequence"]), ctx.val(a["input"]))
    seq = _cast(ctx[a["sorted_sequence"]], ctx.dtype(dtype))
    values = _cast(ctx[a["input"]], ctx.dtype(dtype))
    return _insertion_points(seq, values, right).astype(ctx.dtype(node))


@rule(aten.bucketize.Tensor, check=_searchsorted_check)
def bucketize(ctx, node):
    """The bucket of each value among 1-d boundaries: searchsorted with the sides swapped in
    name only (right=False puts a value equal to a boundary in its bucket's left edge)."""
    a = args(node)
    dtype = torch.result_type(ctx.val(a["input"]), ctx.val(a["boundaries"]))
    boundaries = _cast(ctx[a["boundaries"]], ctx.dtype(dtype))
    values = _cast(ctx[a["input"]], ctx.dtype(dtype))
    return _insertion_points(boundaries, values, bool(a["right"])).astype(ctx.dtype(node))


@rule(aten.nonzero_static.default)
def nonzero_static(ctx, node):
    """The first `size` nonzero positions in row-major order, [size, ndim], padded with
    fill_value rows."""
    a = args(node)
    x = ctx[a["input"]]
    (size, _) = ctx.shape(node)
    if x.ndim == 0:
        return jnp.zeros((size, 0), jnp.int64)
    where = jnp.nonzero(x, size=size, fill_value=a["fill_value"])
    return jnp.stack(where, axis=1).astype(jnp.int64)
