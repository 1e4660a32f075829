"""Exact k-nearest-neighbour anomaly scores in JAX (SPEC section 7).

The score is the sum of squared L2 distances to the ``k`` nearest gallery rows. Rows are selected by
``s = ||g||^2 - (2q).g`` (HIGHEST-precision matmuls, at least float32), then their distances are
recomputed directly, so a score does not depend on how the work was blocked. Queries run in chunks
sized by a memory budget (:func:`plan_scoring`); on CPU a two-stage selection over groups of rows
avoids most of XLA's single-threaded top-k (measurements: ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_MEMORY_BUDGET_BYTES: int = 256 * 1024**2
"""Default bound (bytes) on the scoring work buffers held at once (gallery and queries excluded)."""

MAX_QUERY_CHUNK: int = 1024
"""Upper bound on the query chunk size (larger chunks brought no speed-up on CPU)."""

MIN_QUERY_CHUNK: int = 8
"""Smallest query chunk used before the gallery is split into tiles instead."""

PREFERRED_GROUP: int = 16
"""Row multiple used for gallery tiles, so that groups always exist."""

_GROUP_RANGE = (2, 64)


def _compute_dtype(*arrays: jax.typing.ArrayLike) -> jnp.dtype:
    """Returns the float dtype used for distances: the inputs' type, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def group_size(num_rows: int, k: int, dim: int) -> int:
    """Rows per group for the two-stage selection over ``num_rows`` gallery rows (1 = no groups)."""
    target = 2.0 * math.sqrt(num_rows / (k * dim))
    if target < 3:
        return 1
    candidates = [
        b
        for b in range(_GROUP_RANGE[0], _GROUP_RANGE[1] + 1)
        if num_rows % b == 0 and num_rows // b >= k
    ]
    if not candidates:
        return 1
    best = min(candidates, key=lambda b: (abs(math.log(b / target)), -b))
    return best if abs(math.log(best / target)) <= math.log(2) else 1


def _bytes_per_query(tile: int, group: int, k: int, dim: int, itemsize: int) -> int:
    """Working bytes per query row of a chunk, for one gallery tile (see :func:`plan_scoring`)."""
    # The query chunk and its doubled copy, and the [chunk, tile] block of keys: XLA writes it
    # for a plain top-k, and XLA:CPU's fused matmul-reduce (YNNPACK) also holds it internally.
    per_query = 2 * dim + tile + k * dim  # ... and the k selected rows, gathered to refine
    if group > 1:
        per_query += 2 * (tile // group)  # group minima and their transposed, negated copy
        per_query += k * group * (dim + 2)  # gathered candidate rows, their norms and keys
    return per_query * itemsize


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """How :func:`knn_distances` splits the work (all sizes static, one compilation per plan).

    Attributes:
      query_chunk: queries per step of the outer loop.
      gallery_tile: gallery rows per inner step (the whole gallery when not tiled).
      group: rows per group of the two-stage selection (1: plain top-k over the tile).
      work_bytes: estimated peak of the working buffers (``<=`` the budget).
    """

    query_chunk: int
    gallery_tile: int
    group: int
    work_bytes: int


def plan_scoring(
    num_queries: int,
    num_gallery: int,
    dim: int,
    k: int = 2,
    *,
    itemsize: int = 4,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_size: int | None = None,
    grouped: bool = True,
) -> ScoringPlan:
    """Chooses chunk, tile and group sizes so the working buffers fit ``memory_budget_bytes``.

    Args:
      num_queries: number of query rows (> 0).
      num_gallery: number of gallery rows, padding included (> 0).
      dim: feature dimension.
      k: number of neighbours.
      itemsize: bytes per value (4 for float32).
      memory_budget_bytes: bound on the working buffers, in bytes.
      chunk_size: if given, the query chunk size (the budget then only sizes the gallery tiles).
      grouped: allow the two-stage selection (False: always a plain top-k).

    Raises:
      ValueError: for non-positive sizes or a budget too small for the smallest plan.
    """
    if num_queries <= 0 or num_gallery <= 0 or dim <= 0:
        raise ValueError(
            f"need positive sizes, got {num_queries} queries, {num_gallery} gallery rows, dim {dim}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    group = group_size(num_gallery, k, dim) if grouped else 1
    per_query = _bytes_per_query(num_gallery, group, k, dim, itemsize)
    if chunk_size is None:
        fits = memory_budget_bytes // per_query
        chunk = min(num_queries, MAX_QUERY_CHUNK, fits)
        if chunk >= min(MIN_QUERY_CHUNK, num_queries):
            chunk = -(-num_queries // -(-num_queries // chunk))  # balance the chunks
            return ScoringPlan(chunk, num_gallery, group, chunk * per_query)
        chunk = min(num_queries, MIN_QUERY_CHUNK)
    else:
        chunk = min(chunk_size, num_queries)
        if chunk * per_query <= memory_budget_bytes:
            return ScoringPlan(chunk, num_gallery, group, chunk * per_query)

    # Tile the gallery: the largest tile whose working buffers fit, grouped when possible.
    budget_per_query = memory_budget_bytes // chunk
    for tile_group in (PREFERRED_GROUP, 1) if grouped else (1,):
        fixed = _bytes_per_query(0, tile_group, k, dim, itemsize)
        per_row = _bytes_per_query(tile_group, tile_group, k, dim, itemsize) - fixed
        tile = (budget_per_query - fixed) // per_row * tile_group if budget_per_query > fixed else 0
        tile = min(tile, num_gallery // tile_group * tile_group)
        if tile_group > 1 and tile // tile_group < max(k, 2):
            continue
        if tile >= 1:
            work = chunk * _bytes_per_query(tile, tile_group, k, dim, itemsize)
            tuned = group_size(tile, k, dim) if tile_group > 1 else 1
            tuned_work = chunk * _bytes_per_query(tile, tuned, k, dim, itemsize)
            if tuned > 1 and tuned_work <= memory_budget_bytes:
                tile_group, work = tuned, tuned_work
            return ScoringPlan(chunk, tile, tile_group, work)
    smallest = chunk * _bytes_per_query(1, 1, k, dim, itemsize)
    raise ValueError(
        f"memory_budget_bytes={memory_budget_bytes} is too small for a chunk of {chunk} queries "
        f"of dim {dim}; use at least {smallest} bytes or a smaller chunk_size"
    )


def _select_smallest(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` smallest entries of each row of ``values``, ascending, and their positions."""
    negated, positions = lax.top_k(-values, k)
    return -negated, positions


def _refined(q: jax.Array, rows: jax.Array, index: jax.Array, keys: jax.Array) -> jax.Array:
    """``||q - rows[index]||^2`` per query ``[chunk, count]``; +inf where the key is (masked)."""
    diff = q[:, None, :] - rows[index]
    return jnp.where(jnp.isinf(keys), jnp.inf, jnp.sum(diff * diff, axis=-1))


def _clamped_start(index: jax.Array, size: int, total: int) -> jax.Array:
    """Start of block ``index`` of ``size`` rows, moved back so the block ends inside ``total``."""
    return jnp.minimum(index * size, total - size)


def _smallest_distances(
    q2: jax.Array,
    rows: jax.Array,
    rows_sq: jax.Array,
    count: int,
    group: int,
) -> jax.Array:
    """Squared distances of the rows with the ``count`` smallest ``s = ||g||^2 - (2q).g``.

    With ``group > 1``: the minimum of ``s`` per group (fused into the matmul) picks ``count``
    groups, whose rows are then ranked. Exact: every selected group's minimum is at most that of
    any unselected group, so the ``count`` smallest candidates are the ``count`` smallest overall.
    """
    num_rows = rows.shape[0]
    dot_dims = (((1,), (1,)), ((), ()))
    q = q2 * 0.5  # exact
    if group == 1:
        dots = lax.dot_general(q2, rows, dot_dims, precision=lax.Precision.HIGHEST)
        keys, index = _select_smallest(rows_sq[None, :] - dots, count)
        return _refined(q, rows, index, keys)
    chunk = q2.shape[0]
    num_groups = num_rows // group
    dots_t = lax.dot_general(rows, q2, dot_dims, precision=lax.Precision.HIGHEST)  # [rows, chunk]
    keys_t = (rows_sq[:, None] - dots_t).reshape(num_groups, group, chunk)
    group_min = jnp.min(keys_t, axis=1)  # [groups, chunk]
    best_groups = lax.top_k(-group_min.T, count)[1]  # [chunk, count]
    index = (best_groups[:, :, None] * group + jnp.arange(group)).reshape(chunk, count * group)
    candidates = rows[index]  # [chunk, count * group, dim]
    keys = rows_sq[index] - jnp.einsum(
        "cd,cnd->cn", q2, candidates, precision=lax.Precision.HIGHEST
    )
    keys, positions = _select_smallest(keys, count)
    return _refined(q, rows, jnp.take_along_axis(index, positions, axis=1), keys)


def _local_topk(
    gallery: jax.Array,
    queries: jax.Array,
    valid: jax.Array,
    *,
    k: int,
    query_chunk: int,
    gallery_tile: int,
    group: int,
) -> jax.Array:
    """Traceable core: the ``k`` smallest squared distances of every query, ``[Q, k]`` ascending.

    Chunks and tiles are dynamic slices clamped to end at the last row (nothing copied or padded);
    rows covered twice are dropped or masked.
    """
    dtype = _compute_dtype(gallery, queries)
    gallery = gallery.astype(dtype)
    queries = queries.astype(dtype)
    num_queries = queries.shape[0]
    num_gallery = gallery.shape[0]
    if gallery_tile % group:
        raise ValueError(f"group {group} must divide gallery_tile {gallery_tile}")

    # Selection key s = ||g||^2 - (2q).g; masked rows get +inf so they lose every comparison.
    gallery_sq = jnp.where(valid, jnp.sum(gallery * gallery, axis=1), jnp.inf)
    num_tiles = -(-num_gallery // gallery_tile)
    tile_k = min(k, gallery_tile)

    def smallest(q2: jax.Array, rows: jax.Array, rows_sq: jax.Array) -> jax.Array:
        return _smallest_distances(q2, rows, rows_sq, tile_k, group)

    def tile_step(t: jax.Array, best: jax.Array, q2: jax.Array) -> jax.Array:
        start = _clamped_start(t, gallery_tile, num_gallery)
        rows = lax.dynamic_slice_in_dim(gallery, start, gallery_tile)
        rows_sq = lax.dynamic_slice_in_dim(gallery_sq, start, gallery_tile)
        if num_gallery % gallery_tile:
            fresh = start + jnp.arange(gallery_tile) >= t * gallery_tile
            rows_sq = jnp.where(fresh, rows_sq, jnp.inf)
        merged = jnp.concatenate([best, smallest(q2, rows, rows_sq)], axis=1)
        return -lax.top_k(-merged, k)[0]

    def chunk_distances(q: jax.Array) -> jax.Array:
        q2 = q * 2  # exact: folds the factor 2 of -2 q.g into the small operand
        if num_tiles == 1:
            best = smallest(q2, gallery, gallery_sq)
        else:
            best = jnp.full((q.shape[0], k), jnp.inf, dtype)
            best = lax.fori_loop(0, num_tiles, lambda t, b: tile_step(t, b, q2), best)
        return jnp.sort(best, axis=1)  # refined distances may swap near-ties

    num_chunks = -(-num_queries // query_chunk)
    if num_chunks == 1:
        return chunk_distances(queries)

    def chunk_at(i: jax.Array) -> jax.Array:
        start = _clamped_start(i, query_chunk, num_queries)
        return chunk_distances(lax.dynamic_slice_in_dim(queries, start, query_chunk))

    per_chunk = lax.map(chunk_at, jnp.arange(num_chunks))  # [num_chunks, query_chunk, k]
    # The last chunk starts at Q - query_chunk; keep only its rows not covered before.
    overlap = num_chunks * query_chunk - num_queries
    head = per_chunk[:-1].reshape((num_chunks - 1) * query_chunk, k)
    return jnp.concatenate([head, per_chunk[-1, overlap:]], axis=0)


_local_topk_jit = jax.jit(
    _local_topk, static_argnames=("k", "query_chunk", "gallery_tile", "group")
)


def _use_groups(gallery: jax.typing.ArrayLike) -> bool:
    """Whether to allow the two-stage selection, which was designed and measured on XLA:CPU."""
    if isinstance(gallery, jax.Array):
        return all(d.platform == "cpu" for d in gallery.devices())
    return jax.default_backend() == "cpu"


def _to_device(x: jax.typing.ArrayLike) -> jax.Array:
    """A JAX array as is; a host array with a single copy (``jnp.asarray`` may copy twice)."""
    if isinstance(x, jax.Array):
        return x
    return jax.device_put(np.asarray(x), may_alias=True)


def _check_inputs(
    gallery: jax.typing.ArrayLike,
    queries: jax.typing.ArrayLike,
    k: int,
    gallery_mask: jax.typing.ArrayLike | None,
) -> None:
    """Validates shapes, ``k`` and (when concrete) the number of unmasked gallery rows."""
    g_shape, q_shape = np.shape(gallery), np.shape(queries)
    if len(g_shape) != 2 or len(q_shape) != 2:
        raise ValueError(
            f"gallery and queries must be 2-D [rows, dim], got shapes {g_shape} and {q_shape}"
        )
    if g_shape[1] != q_shape[1]:
        raise ValueError(
            f"gallery dim {g_shape[1]} != query dim {q_shape[1]}; pass features of the same model"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > g_shape[0]:
        raise ValueError(f"k={k} exceeds the gallery size {g_shape[0]}; use a smaller k")
    if gallery_mask is not None:
        if np.shape(gallery_mask) != (g_shape[0],):
            raise ValueError(
                f"gallery_mask must have shape ({g_shape[0]},), got {np.shape(gallery_mask)}"
            )
        if not isinstance(gallery_mask, jax.core.Tracer):
            valid = int(np.count_nonzero(np.asarray(gallery_mask)))
            if valid < k:
                raise ValueError(
                    f"only {valid} unmasked gallery rows for k={k}; unmask more rows or lower k"
                )


def knn_distances(
    gallery: jax.typing.ArrayLike,
    queries: jax.typing.ArrayLike,
    k: int = 2,
    *,
    gallery_mask: jax.typing.ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_size: int | None = None,
) -> jax.Array:
    """Squared L2 distances from each query to its ``k`` nearest gallery rows, ascending.

    Args:
      gallery: ``[G, D]`` gallery features (normal training images).
      queries: ``[Q, D]`` query features.
      k: number of neighbours.
      gallery_mask: optional ``[G]`` bool; False rows (e.g. padding) are never selected.
      memory_budget_bytes: bound on the distance block (see :func:`plan_scoring`).
      chunk_size: query chunk size; by default derived from the budget.

    Returns:
      ``[Q, k]`` array (float32, or float64 for float64 inputs with x64 enabled).

    Raises:
      ValueError: for mismatched shapes, a bad ``k``, or too few unmasked rows.
    """
    _check_inputs(gallery, queries, k, gallery_mask)
    num_gallery = np.shape(gallery)[0]
    num_queries = np.shape(queries)[0]
    if num_queries == 0:
        return jnp.zeros((0, k), _compute_dtype(gallery, queries))
    plan = plan_scoring(
        num_queries,
        num_gallery,
        np.shape(gallery)[1],
        k,
        itemsize=jnp.dtype(_compute_dtype(gallery, queries)).itemsize,
        memory_budget_bytes=memory_budget_bytes,
        chunk_size=chunk_size,
        grouped=_use_groups(gallery),
    )
    valid = (
        jnp.ones((num_gallery,), bool)
        if gallery_mask is None
        else jnp.asarray(gallery_mask, dtype=bool)
    )
    return _local_topk_jit(
        _to_device(gallery),
        _to_device(queries),
        valid,
        k=k,
        query_chunk=plan.query_chunk,
        gallery_tile=plan.gallery_tile,
        group=plan.group,
    )


def knn_scores(
    gallery: jax.typing.ArrayLike,
    queries: jax.typing.ArrayLike,
    k: int = 2,
    *,
    gallery_mask: jax.typing.ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_size: int | None = None,
) -> jax.Array:
    """Anomaly scores: the sum of squared L2 distances to the ``k`` nearest gallery rows.

    Args:
      gallery: ``[G, D]`` gallery features (phi of the normal training images).
      queries: ``[Q, D]`` query features (phi of the test images).
      k: number of neighbours (2 in MSC).
      gallery_mask: optional ``[G]`` bool; False rows (e.g. padding) are never selected.
      memory_budget_bytes: bound on the distance block, default :data:`DEFAULT_MEMORY_BUDGET_BYTES`
        (see :func:`plan_scoring`).
      chunk_size: query chunk size; by default derived from the budget.

    Returns:
      ``[Q]`` scores (higher = more anomalous).

    Raises:
      ValueError: for mismatched shapes, a bad ``k``, or too few unmasked rows.
    """
    distances = knn_distances(
        gallery,
        queries,
        k,
        gallery_mask=gallery_mask,
        memory_budget_bytes=memory_budget_bytes,
        chunk_size=chunk_size,
    )
    return jnp.sum(distances, axis=1)


def knn_scores_traceable(gallery: jax.Array, queries: jax.Array, k: int = 2) -> jax.Array:
    """:func:`knn_scores` as a plain traceable function, for use inside other jitted functions.

    No chunking: the whole ``[Q, G]`` key block is formed, so ``Q`` may be symbolic (jax.export).

    Args:
      gallery: ``[G, D]`` gallery rows (``k <= G``).
      queries: ``[Q, D]`` query rows.
      k: number of neighbours.

    Returns:
      ``[Q]`` sums of the ``k`` smallest squared distances.
    """
    dtype = _compute_dtype(gallery, queries)
    gallery = jnp.asarray(gallery, dtype)
    queries = jnp.asarray(queries, dtype)
    gallery_sq = jnp.sum(gallery * gallery, axis=1)
    best = _smallest_distances(queries * 2, gallery, gallery_sq, k, 1)
    return jnp.sum(jnp.sort(best, axis=1), axis=1)  # summed in the order of knn_distances
