"""Exact k-nearest-neighbour anomaly scores in JAX (SPEC section 7).

The anomaly score of a query is the sum of squared L2 distances to its ``k`` nearest gallery rows
(the gallery holds phi of the normal training images; ``k = 2`` in MSC).

How it is computed:

* Selection uses ``||q||^2 + ||g||^2 - 2 q.g`` with ``precision=HIGHEST`` on the matmuls, in at
  least float32. Nothing assumes unit-norm inputs. (On CPU, HIGHEST costs nothing: float32 dots
  are float32 either way; measured equal times.)
* Ranking only needs ``s = ||g||^2 - (2q).g`` per query (``||q||^2`` is a per-query constant),
  so selection runs on ``s``. Masked gallery rows get ``||g||^2 = +inf``: they are never
  selected, at no per-element cost. The factor 2 is applied to the query chunk (exact), never to
  the gallery.
* The distances of the ``k`` selected rows are then recomputed as ``sum((q - g)^2)`` from the rows
  themselves (a gather of ``k`` rows per query). The expanded form cancels: for unit vectors its
  float32 error is about 1e-7 absolute whatever the distance, i.e. ~1e-5 relative for the small
  distances of normal images; the direct form is accurate to float32 rounding of the distance, so
  scores no longer depend on how a matmul was blocked (needed for exported scorers to score like
  the detector, :mod:`msad_jax.export`).
* Queries are processed in chunks by one jitted ``lax.map`` over chunk indices, so there is one
  compilation per shape and no host round trip per chunk. Chunks are dynamic slices (the last one
  is moved back to end at the last query), so neither the queries nor the gallery are copied or
  padded. Chunk sizes come from a memory budget (:func:`plan_scoring`); if even a small chunk
  does not fit, the gallery is also split into tiles scanned with a running top-k merge.
* Selection (:func:`_smallest_distances`) is exact and two-stage when the gallery size allows: the
  minimum of ``s`` over groups of consecutive gallery rows is fused into the matmul by XLA:CPU (the
  ``[chunk, gallery]`` block is never written), a top-k over the group minima picks ``k`` groups,
  and their rows are re-scored exactly. Otherwise a plain ``lax.top_k`` runs on the block.
  Measured on a 2-core AVX-512 Xeon (shared, noisy): XLA's CPU TopK is single-threaded and costs
  ~2.5 ns per element, 20-40% of the matmul at dim 512; the two-stage selection removes most of
  that for large galleries (~15% faster at 50000 x 512) and ties at 5000 x 512. Alternatives
  measured and rejected: two-pass min/argmin, a variadic "two smallest" reduce, a min/count/min
  scheme and a min/max tournament (no faster, or slower). Note: a top-k whose index output is only
  partly used is lowered by XLA to a full sort (10x slower), so the indices are used whole.

Sharded galleries: :func:`sharded_knn_scores` splits the gallery rows over local devices with
``jax.shard_map`` (padding rows are masked), computes each device's local top-k, all-gathers the
``k`` candidates of every device and merges them with a second top-k. This is exact: the global
``k`` nearest are among the union of the per-device ``k`` nearest.

Default memory budget: :data:`DEFAULT_MEMORY_BUDGET_BYTES` = 256 MiB for the working buffers of
scoring (per device). The gallery and queries themselves are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_MEMORY_BUDGET_BYTES: int = 256 * 1024**2
"""Default bound (bytes) on the scoring work buffers held at once (gallery and queries excluded)."""

MAX_QUERY_CHUNK: int = 1024
"""Upper bound on the query chunk size (larger chunks brought no speed-up on CPU)."""

MIN_QUERY_CHUNK: int = 8
"""Smallest query chunk used before the gallery is split into tiles instead."""

PREFERRED_GROUP: int = 16
"""Row multiple used for gallery tiles and sharded galleries, so that groups always exist."""

_GROUP_RANGE = (2, 64)
_GALLERY_AXIS = "gallery"


def _compute_dtype(*arrays: jax.typing.ArrayLike) -> jnp.dtype:
    """Returns the float dtype used for distances: the inputs' type, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def group_size(num_rows: int, k: int, dim: int) -> int:
    """Rows per group for the two-stage selection over ``num_rows`` gallery rows (1 = no groups).

    Stage 2 costs about ``num_rows / group`` top-k work per query and stage 3 gathers
    ``k * group * dim`` values per query; the target ``2 * sqrt(num_rows / (k * dim))`` balances
    the two (measured on a 2-core AVX-512 Xeon: ~5 for 5000 x 512, 10-16 for 50000 x 512). The
    group must divide ``num_rows`` (groups are a free reshape of the distance block) and leave at
    least ``k`` groups; the divisor in ``[2, 64]`` closest to the target (by ratio) is used. Plain
    top-k (1) is used when the target is below 3 or no divisor is within a factor 2 of it.
    """
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

    Memory model, per query row of a chunk, in units of ``itemsize``: ``2 * dim`` for the query
    chunk and its doubled copy, ``tile`` for the ``[chunk, tile]`` block of keys, ``k * dim`` for
    the selected rows (gathered to refine their distances), and for the two-stage selection also
    ``2 * tile / group + k * group * (dim + 2)`` (group minima and their transposed copy, then
    the gathered candidate rows). Checked against XLA's compiled temp sizes
    and the measured peak RSS of a call (the fused matmul-reduce holds the block internally,
    which the compiled temp size does not show). The whole gallery is one tile when a chunk of at
    least :data:`MIN_QUERY_CHUNK` queries fits; then the chunk is the largest that fits (at most
    :data:`MAX_QUERY_CHUNK`), balanced so that all chunks have nearly equal sizes. Otherwise the
    gallery is split into tiles (multiples of :data:`PREFERRED_GROUP` rows when possible).

    Args:
      num_queries: number of query rows (> 0).
      num_gallery: number of gallery rows, padding included (> 0).
      dim: feature dimension.
      k: number of neighbours.
      itemsize: bytes per value (4 for float32).
      memory_budget_bytes: bound on the working buffers, in bytes.
      chunk_size: if given, the query chunk size (the budget then only sizes the gallery tiles).
      grouped: allow the two-stage selection (False: always a plain top-k).

    Returns:
      The :class:`ScoringPlan`.

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


def _select_smallest(
    values: jax.Array, k: int, approximate: bool, recall_target: float
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` smallest entries of each row of ``values``, ascending, and their positions."""
    if approximate:
        return lax.approx_min_k(values, k, recall_target=recall_target)
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
    approximate: bool,
    recall_target: float,
) -> jax.Array:
    """Squared distances of the rows with the ``count`` smallest ``s = ||g||^2 - (2q).g``.

    Selection is by ``s``; the selected rows' distances ``||q - g||^2`` are then computed
    directly (:func:`_refined`), in the order of ``s`` (ascending up to rounding).

    With ``group == 1`` this is a top-k over the ``[chunk, rows]`` block. With ``group > 1`` it is
    a two-stage exact selection: (1) the minimum of ``s`` over each group of ``group`` consecutive
    rows, computed by one matmul with the reduction fused into it (XLA:CPU fuses
    ``dot -> subtract -> reduce_min`` when the reduced axis is the major one, so the full block is
    never written); (2) a top-k over the group minima picks ``count`` groups per query; (3) their
    ``count * group`` rows are gathered and scored exactly, and a top-k over them gives the answer.

    Why (2) keeps the exact answer: let ``w_j`` be the true ``j``-th smallest value. If fewer than
    ``j`` candidates were ``<= w_j``, some row ``y`` with ``s(y) <= w_j`` lies in an unselected
    group ``H``; every selected group then has minimum ``<= min(H) <= w_j``, which gives ``count``
    distinct candidates ``<= w_j`` -- a contradiction. So the ``count`` smallest candidate values
    equal the ``count`` smallest values overall (ties included).
    """
    num_rows = rows.shape[0]
    dot_dims = (((1,), (1,)), ((), ()))
    q = q2 * 0.5  # exact
    if group == 1:
        dots = lax.dot_general(q2, rows, dot_dims, precision=lax.Precision.HIGHEST)
        keys, index = _select_smallest(rows_sq[None, :] - dots, count, approximate, recall_target)
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
    keys, positions = _select_smallest(keys, count, approximate, recall_target)
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
    approximate: bool = False,
    recall_target: float = 0.95,
) -> jax.Array:
    """Traceable core: the ``k`` smallest squared distances of every query, ``[Q, k]`` ascending.

    Neither input is copied or padded: query chunks and gallery tiles are dynamic slices whose
    start is clamped so that the last block ends at the last row. The last query chunk therefore
    recomputes a few rows of the previous one (the duplicates are dropped); in the last gallery
    tile, rows already covered by the previous tile are masked out so nothing is counted twice.

    Args:
      gallery: ``[G, D]`` gallery rows.
      queries: ``[Q, D]`` query rows.
      valid: ``[G]`` bool, False rows are never selected (their distance is +inf).
      k: number of neighbours (``k <= G``).
      query_chunk: queries per loop step (``<= Q``).
      gallery_tile: gallery rows per inner step (``<= G``; ``G`` means no tiling).
      group: rows per group of the two-stage selection (must divide ``gallery_tile``).
      approximate: use ``lax.approx_min_k`` instead of the exact ``lax.top_k``.
      recall_target: recall target of the approximate mode.

    Returns:
      ``[Q, k]`` distances, ascending; +inf where fewer than ``k`` valid rows exist.
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
        return _smallest_distances(q2, rows, rows_sq, tile_k, group, approximate, recall_target)

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
            # The first tile seeds the running best (padded to k with +inf if tile_k < k); a
            # seed computed from the data keeps the loop carry's sharding type under shard_map.
            first = smallest(q2, gallery[:gallery_tile], gallery_sq[:gallery_tile])
            if tile_k < k:
                first = jnp.pad(first, ((0, 0), (0, k - tile_k)), constant_values=jnp.inf)
            best = lax.fori_loop(1, num_tiles, lambda t, b: tile_step(t, b, q2), first)
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
    _local_topk,
    static_argnames=("k", "query_chunk", "gallery_tile", "group", "approximate", "recall_target"),
)


def _use_groups(gallery: jax.typing.ArrayLike, approximate: bool) -> bool:
    """Whether to allow the two-stage selection, which was designed and measured on XLA:CPU.

    Elsewhere, and in approximate mode (``lax.approx_min_k`` is meant to see the whole block on
    TPU), a plain top-k is used.
    """
    if approximate:
        return False
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
    approximate: bool = False,
    recall_target: float = 0.95,
) -> jax.Array:
    """Squared L2 distances from each query to its ``k`` nearest gallery rows, ascending.

    Args:
      gallery: ``[G, D]`` gallery features (normal training images).
      queries: ``[Q, D]`` query features.
      k: number of neighbours.
      gallery_mask: optional ``[G]`` bool; False rows (e.g. padding) are never selected.
      memory_budget_bytes: bound on the distance block (see :func:`plan_scoring`).
      chunk_size: query chunk size; by default derived from the budget.
      approximate: use ``lax.approx_min_k`` (fast on TPU; on CPU/GPU it is exact but slower).
      recall_target: recall target of the approximate mode.

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
        grouped=_use_groups(gallery, approximate),
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
        approximate=approximate,
        recall_target=recall_target,
    )


def knn_scores(
    gallery: jax.typing.ArrayLike,
    queries: jax.typing.ArrayLike,
    k: int = 2,
    *,
    gallery_mask: jax.typing.ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_size: int | None = None,
    approximate: bool = False,
    recall_target: float = 0.95,
) -> jax.Array:
    """Anomaly scores: the sum of squared L2 distances to the ``k`` nearest gallery rows.

    Args:
      gallery: ``[G, D]`` gallery features (phi of the normal training images).
      queries: ``[Q, D]`` query features (phi of the test images).
      k: number of neighbours (2 in MSC).
      gallery_mask: optional ``[G]`` bool; False rows (e.g. padding) are never selected.
      memory_budget_bytes: bound on the distance block, default
        :data:`DEFAULT_MEMORY_BUDGET_BYTES` (see :func:`plan_scoring`).
      chunk_size: query chunk size; by default derived from the budget.
      approximate: use ``lax.approx_min_k`` (fast on TPU; on CPU/GPU it is exact but slower).
      recall_target: recall target of the approximate mode.

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
        approximate=approximate,
        recall_target=recall_target,
    )
    return jnp.sum(distances, axis=1)


def knn_scores_traceable(gallery: jax.Array, queries: jax.Array, k: int = 2) -> jax.Array:
    """:func:`knn_scores` as a plain traceable function, for use inside other jitted functions.

    No chunking or memory plan: the whole ``[Q, G]`` block of selection keys is formed (with the
    same selection and refined distances as :func:`knn_scores`), so the number of queries may be
    a symbolic dimension (``jax.export``). Mind its memory: ``Q * G`` values.

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
    best = _smallest_distances(queries * 2, gallery, gallery_sq, k, 1, False, 0.95)
    return jnp.sum(jnp.sort(best, axis=1), axis=1)  # summed in the order of knn_distances


@functools.lru_cache(maxsize=16)
def _sharded_fn(
    mesh: Mesh,
    k: int,
    plan: ScoringPlan,
    approximate: bool,
    recall_target: float,
):
    """Builds (and caches) the jitted shard_map scorer for one mesh and static configuration."""

    def per_device(gallery: jax.Array, valid: jax.Array, queries: jax.Array) -> jax.Array:
        local = _local_topk(
            gallery,
            queries,
            valid,
            k=k,
            query_chunk=plan.query_chunk,
            gallery_tile=plan.gallery_tile,
            group=plan.group,
            approximate=approximate,
            recall_target=recall_target,
        )
        candidates = lax.all_gather(  # [Q, n * k], the same on every device
            local, _GALLERY_AXIS, axis=1, tiled=True, to="invarying"
        )
        return jnp.sum(-lax.top_k(-candidates, k)[0], axis=1)

    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(_GALLERY_AXIS), P(_GALLERY_AXIS), P()),
        out_specs=P(),
    )
    return jax.jit(mapped)


def sharded_knn_scores(
    gallery: jax.typing.ArrayLike,
    queries: jax.typing.ArrayLike,
    k: int = 2,
    *,
    gallery_mask: jax.typing.ArrayLike | None = None,
    devices: Sequence[jax.Device] | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_size: int | None = None,
    approximate: bool = False,
    recall_target: float = 0.95,
) -> jax.Array:
    """:func:`knn_scores` with the gallery rows split across devices.

    The gallery is padded to ``n_devices * rows_per_device`` rows (padding masked out;
    ``rows_per_device`` is at least ``k`` and a multiple of :data:`PREFERRED_GROUP`) and placed
    with one contiguous block of rows per device; queries are replicated. Each device finds its
    local ``k`` nearest (within ``memory_budget_bytes`` per device), the ``n_devices * k``
    candidates are all-gathered and merged with a top-k. The result is exactly that of
    :func:`knn_scores` on the whole gallery.

    Args:
      gallery: ``[G, D]`` gallery features (a host array is split directly onto the devices).
      queries: ``[Q, D]`` query features.
      k: number of neighbours.
      gallery_mask: optional ``[G]`` bool; False rows are never selected.
      devices: devices to use (default: all local devices).
      memory_budget_bytes: per-device bound on the distance block.
      chunk_size: query chunk size; by default derived from the budget.
      approximate: use ``lax.approx_min_k`` for the local selection.
      recall_target: recall target of the approximate mode.

    Returns:
      ``[Q]`` scores, replicated on the devices.

    Raises:
      ValueError: for mismatched shapes, a bad ``k``, or too few unmasked rows.
    """
    _check_inputs(gallery, queries, k, gallery_mask)
    devices = list(jax.local_devices() if devices is None else devices)
    num_devices = len(devices)
    num_gallery, _ = np.shape(gallery)
    num_queries = np.shape(queries)[0]
    if num_queries == 0:
        return jnp.zeros((0,), _compute_dtype(gallery, queries))
    # Rows per device: a multiple of PREFERRED_GROUP, so the two-stage selection always applies.
    rows_per_device = max(math.ceil(num_gallery / num_devices), k)
    rows_per_device = -(-rows_per_device // PREFERRED_GROUP) * PREFERRED_GROUP
    pad = rows_per_device * num_devices - num_gallery

    is_host = isinstance(gallery, np.ndarray)
    xp = np if is_host else jnp
    gallery_arr = gallery if is_host else jnp.asarray(gallery)
    valid = (
        xp.ones((num_gallery,), bool) if gallery_mask is None else xp.asarray(gallery_mask, bool)
    )
    if pad:
        gallery_arr = xp.pad(gallery_arr, ((0, pad), (0, 0)))
        valid = xp.pad(valid, (0, pad), constant_values=False)

    mesh = Mesh(np.asarray(devices), (_GALLERY_AXIS,))
    row_sharding = NamedSharding(mesh, P(_GALLERY_AXIS))
    gallery_arr = jax.device_put(gallery_arr, row_sharding)
    valid = jax.device_put(valid, row_sharding)
    queries_arr = jax.device_put(queries, NamedSharding(mesh, P()))

    plan = plan_scoring(
        num_queries,
        rows_per_device,
        np.shape(gallery)[1],
        k,
        itemsize=jnp.dtype(_compute_dtype(gallery_arr, queries_arr)).itemsize,
        memory_budget_bytes=memory_budget_bytes,
        chunk_size=chunk_size,
        grouped=_use_groups(gallery_arr, approximate),
    )
    fn = _sharded_fn(mesh, k, plan, approximate, float(recall_target))
    return fn(gallery_arr, valid, queries_arr)


def kmeans_gallery(
    gallery: jax.typing.ArrayLike,
    n_clusters: int,
    key: jax.Array,
    iters: int = 20,
    *,
    gallery_mask: jax.typing.ArrayLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Shrinks a gallery to ``n_clusters`` k-means centroids (Lloyd's algorithm, squared L2).

    Initial centroids are ``n_clusters`` distinct unmasked rows drawn uniformly with ``key``. Each
    iteration assigns every row to its nearest centroid (chunked like :func:`knn_scores`) and moves
    every centroid to the mean of its rows; a centroid that loses all its rows stays where it is.

    Args:
      gallery: ``[G, D]`` features.
      n_clusters: number of centroids (``1 <= n_clusters <= unmasked rows``).
      key: PRNG key for the initial draw.
      iters: number of Lloyd iterations (>= 0).
      gallery_mask: optional ``[G]`` bool; False rows are ignored.
      memory_budget_bytes: bound on the ``[chunk, n_clusters]`` distance block.

    Returns:
      ``[n_clusters, D]`` centroids.

    Raises:
      ValueError: for a bad ``n_clusters`` or ``iters``.
    """
    g_shape = np.shape(gallery)
    if len(g_shape) != 2:
        raise ValueError(f"gallery must be 2-D [rows, dim], got shape {g_shape}")
    valid = (
        np.ones((g_shape[0],), bool)
        if gallery_mask is None
        else np.asarray(gallery_mask, dtype=bool)
    )
    num_valid = int(valid.sum())
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= num_valid:
        raise ValueError(
            f"n_clusters must be an integer in [1, {num_valid}] (unmasked rows), got {n_clusters!r}"
        )
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    # Per row of a chunk: the [chunk, n_clusters] block and its copy, the row and its copy.
    row_bytes = jnp.dtype(_compute_dtype(gallery)).itemsize * 2 * (n_clusters + g_shape[1])
    row_chunk = max(1, min(g_shape[0], MAX_QUERY_CHUNK, memory_budget_bytes // row_bytes))
    return _kmeans_jit(
        _to_device(gallery),
        jnp.asarray(valid),
        key,
        n_clusters=n_clusters,
        iters=iters,
        row_chunk=row_chunk,
    )


def _nearest_centroid(rows: jax.Array, centroids: jax.Array, row_chunk: int) -> jax.Array:
    """Index of the nearest centroid of every row, computed ``row_chunk`` rows at a time."""
    num_rows, dim = rows.shape
    cent_sq = jnp.sum(centroids * centroids, axis=1)
    cent_2 = centroids * 2

    def chunk_argmin(block: jax.Array) -> jax.Array:
        dots = lax.dot_general(
            block, cent_2, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST
        )
        return jnp.argmin(cent_sq[None, :] - dots, axis=1)

    num_chunks = -(-num_rows // row_chunk)
    pad = num_chunks * row_chunk - num_rows
    padded = jnp.pad(rows, ((0, pad), (0, 0))) if pad else rows
    out = lax.map(chunk_argmin, padded.reshape(num_chunks, row_chunk, dim))
    return out.reshape(-1)[:num_rows]


@functools.partial(jax.jit, static_argnames=("n_clusters", "iters", "row_chunk"))
def _kmeans_jit(
    gallery: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    *,
    n_clusters: int,
    iters: int,
    row_chunk: int,
) -> jax.Array:
    """Jitted Lloyd iterations (see :func:`kmeans_gallery`)."""
    rows = gallery.astype(_compute_dtype(gallery))
    probs = valid / jnp.sum(valid)
    init_idx = jax.random.choice(key, rows.shape[0], (n_clusters,), replace=False, p=probs)
    centroids = rows[init_idx]
    weights = valid.astype(rows.dtype)

    def step(_: int, centroids: jax.Array) -> jax.Array:
        assign = _nearest_centroid(rows, centroids, row_chunk)
        sums = jax.ops.segment_sum(rows * weights[:, None], assign, num_segments=n_clusters)
        counts = jax.ops.segment_sum(weights, assign, num_segments=n_clusters)
        means = sums / jnp.maximum(counts, 1)[:, None]
        return jnp.where(counts[:, None] > 0, means, centroids)

    return lax.fori_loop(0, iters, step, centroids)
