import faiss
import jax
import numpy as np
import pytest

from msad_jax import knn


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(gallery, queries, k, mask=None):
    """Float64 oracle from explicit differences (not the ||q||^2 + ||g||^2 - 2q.g expansion)."""
    g = np.asarray(gallery, np.float64)
    if mask is not None:
        g = g[np.asarray(mask, bool)]
    q = np.asarray(queries, np.float64)
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, :k]


def _faiss_k2(gallery, queries):
    index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, np.float32))
    distances, _ = index.search(np.ascontiguousarray(queries, np.float32), 2)
    return distances.sum(axis=1)


@pytest.mark.parametrize("chunk_size", [None, 5, 16, 64])
@pytest.mark.parametrize(("n_gallery", "dim", "group"), [(53, 24, 1), (1000, 16, 10)])
def test_matches_brute_force_and_faiss(chunk_size, n_gallery, dim, group):
    rng = np.random.default_rng(0)
    gallery, queries = _unit_rows(rng, n_gallery, dim), _unit_rows(rng, 37, dim)  # 37 % 5 != 0
    assert knn.plan_scoring(37, n_gallery, dim, 2, chunk_size=chunk_size).group == group
    got = np.asarray(knn.knn_scores(gallery, queries, chunk_size=chunk_size))
    assert got.shape == (37,)
    np.testing.assert_allclose(got, _brute_force(gallery, queries, 2).sum(1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, _faiss_k2(gallery, queries), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_other_k_and_sorted_distances(k):
    rng = np.random.default_rng(1)
    gallery, queries = _unit_rows(rng, 40, 8), _unit_rows(rng, 21, 8)
    got = np.asarray(knn.knn_distances(gallery, queries, k, chunk_size=4))
    np.testing.assert_allclose(got, _brute_force(gallery, queries, k), rtol=0, atol=1e-5)
    assert np.all(np.diff(got, axis=1) >= 0)


def test_not_unit_norm_inputs():
    rng = np.random.default_rng(2)
    gallery = (rng.standard_normal((64, 32)) * 3 + 1).astype(np.float32)
    queries = (rng.standard_normal((19, 32)) * 3 + 1).astype(np.float32)
    got = np.asarray(knn.knn_scores(gallery, queries, chunk_size=7))
    np.testing.assert_allclose(got, _brute_force(gallery, queries, 2).sum(1), rtol=1e-5)


@pytest.mark.parametrize("n_gallery", [50, 1000])  # plain and two-stage selection
def test_masked_rows_are_never_selected(n_gallery):
    rng = np.random.default_rng(3)
    gallery, queries = _unit_rows(rng, n_gallery, 16), _unit_rows(rng, 23, 16)
    mask = rng.random(n_gallery) < 0.6
    # Masked-out rows are copies of queries: they would be the nearest (distance 0) if selected.
    hidden = np.flatnonzero(~mask)[:10]
    gallery[hidden] = queries[: len(hidden)]
    got = np.asarray(knn.knn_scores(gallery, queries, gallery_mask=mask, chunk_size=6))
    expected = _brute_force(gallery, queries, 2, mask).sum(1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, _faiss_k2(gallery[mask], queries), rtol=0, atol=1e-5)
    assert np.all(got[: len(hidden)] > 1e-3)


@pytest.mark.parametrize("k", [3, 20])
def test_tiled_gallery_path_under_a_tiny_budget(k):
    rng = np.random.default_rng(4)
    gallery, queries = _unit_rows(rng, 300, 16), _unit_rows(rng, 29, 16)
    mask = rng.random(300) < 0.8
    # A budget that fits a chunk of 8 queries against 70 gallery rows (no groups): 300 % 70 != 0.
    # Per query, in float32 units: 2 * dim for the query chunk, k * dim for the k selected rows
    # (gathered to refine their distances), and 70 for the block.
    budget = 8 * 4 * (2 * 16 + k * 16 + 70)
    plan = knn.plan_scoring(29, 300, 16, k, memory_budget_bytes=budget)
    assert plan.query_chunk == 8 and 1 < plan.gallery_tile < 300 and plan.work_bytes <= budget
    got = np.asarray(
        knn.knn_scores(gallery, queries, k, gallery_mask=mask, memory_budget_bytes=budget)
    )
    np.testing.assert_allclose(got, _brute_force(gallery, queries, k, mask).sum(1), atol=1e-5)


def test_tiled_and_grouped_path():
    rng = np.random.default_rng(11)
    gallery, queries = _unit_rows(rng, 2000, 8), _unit_rows(rng, 20, 8)
    mask = rng.random(2000) < 0.9
    gallery[np.flatnonzero(~mask)[:10]] = queries[:10]  # nearest if ever selected
    # Per query, in float32 units: 2 * dim + k * dim + k * group * (dim + 2) fixed, plus group + 2
    # per group of 16 rows (block + minima + copy): 50 groups -> tiles of 800 rows.
    budget = 8 * 4 * (2 * 8 + 2 * 8 + 2 * 16 * 10 + 18 * 50)
    plan = knn.plan_scoring(20, 2000, 8, 2, memory_budget_bytes=budget)
    assert plan.query_chunk == 8 and plan.gallery_tile == 800 and plan.group > 1
    assert plan.work_bytes <= budget
    got = np.asarray(
        knn.knn_distances(gallery, queries, 2, gallery_mask=mask, memory_budget_bytes=budget)
    )
    np.testing.assert_allclose(got, _brute_force(gallery, queries, 2, mask), atol=1e-5)


@pytest.mark.parametrize("group", [1, 4, 15])
def test_grouped_selection_paths(group):
    # Galleries whose size has (or lacks) a divisor in [4, 64]; the group is chosen from it.
    rng = np.random.default_rng(9)
    n_gallery = {1: 67, 4: 4 * 67, 15: 15 * 67}[group]  # 67 is prime
    assert knn.group_size(n_gallery, 2, 12) == group
    gallery, queries = _unit_rows(rng, n_gallery, 12), _unit_rows(rng, 33, 12)
    mask = rng.random(n_gallery) < 0.7
    for k in (1, 2, 5):
        got = np.asarray(knn.knn_distances(gallery, queries, k, gallery_mask=mask, chunk_size=10))
        np.testing.assert_allclose(got, _brute_force(gallery, queries, k, mask), atol=1e-5)


@pytest.mark.parametrize(("n_gallery", "budget"), [(160, None), (67, None), (160, 2000)])
def test_exact_on_integer_data_with_many_ties(n_gallery, budget):
    # Small-integer coordinates make every product, norm and distance exact in float32, and
    # give many exactly tied distances, across groups and tiles: results must match exactly.
    rng = np.random.default_rng(10)
    gallery = rng.integers(-2, 3, (n_gallery, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, (41, 8)).astype(np.float32)
    kwargs = {} if budget is None else {"memory_budget_bytes": budget}
    for k in (1, 2, 6):
        got = np.asarray(knn.knn_distances(gallery, queries, k, chunk_size=7, **kwargs))
        np.testing.assert_array_equal(got, _brute_force(gallery, queries, k))


@pytest.mark.parametrize(
    ("n_q", "n_g", "dim", "budget"),
    [
        (10000, 50000, 2048, 256 << 20),
        (10000, 5000, 512, 256 << 20),
        (10000, 4999, 512, 64 << 20),
        (7, 10**7, 64, 1 << 20),
        (100, 10**6, 2048, 1 << 20),
    ],
)
def test_plan_respects_budget(n_q, n_g, dim, budget):
    plan = knn.plan_scoring(n_q, n_g, dim, 2, memory_budget_bytes=budget)
    assert 1 <= plan.query_chunk <= n_q and 1 <= plan.gallery_tile <= n_g
    assert plan.gallery_tile % plan.group == 0
    assert plan.work_bytes <= budget


def test_one_compilation_for_many_chunks():
    rng = np.random.default_rng(6)
    gallery, queries = _unit_rows(rng, 30, 8), _unit_rows(rng, 50, 8)
    jitted = knn._local_topk_jit
    jitted.clear_cache()
    knn.knn_scores(gallery, queries, chunk_size=3).block_until_ready()  # 17 chunks
    assert jitted._cache_size() == 1
    text = jitted.lower(
        gallery, queries, np.ones(30, bool), k=2, query_chunk=3, gallery_tile=30, group=1
    ).as_text()
    assert text.count("dot_general") == 1  # the chunks are a loop, not unrolled


def test_plan_groups_only_when_allowed():
    assert knn.plan_scoring(9, 1000, 8, 2).group > 1
    assert knn.plan_scoring(9, 1000, 8, 2, grouped=False).group == 1  # off the CPU


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 11}, "exceeds the gallery size"),
        ({"k": 0}, "positive integer"),
        ({"gallery_mask": np.eye(10, dtype=bool)[0]}, "only 1 unmasked"),
        ({"gallery_mask": np.ones(3, bool)}, "gallery_mask must have shape"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory_budget_bytes": 16}, "too small"),
        ({"chunk_size": 2, "memory_budget_bytes": 40}, "too small"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    gallery, queries = np.zeros((10, 4), np.float32), np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=match):
        knn.knn_scores(gallery, queries, **kwargs)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="dim"):
        knn.knn_scores(np.zeros((10, 4)), np.zeros((3, 5)))


@pytest.mark.parametrize(("n_gallery", "budget"), [(60, None), (2000, None), (2000, 40000)])
def test_small_distances_are_accurate_to_float32_rounding(n_gallery, budget):
    # Near neighbours of unit vectors: ||q||^2 + ||g||^2 - 2 q.g loses ~1e-7 absolute to
    # cancellation, 1e-3 relative at these distances (~1e-4); the selected rows' distances are
    # recomputed directly, so they keep float32 relative accuracy (plain, grouped, tiled paths).
    rng = np.random.default_rng(12)
    gallery = _unit_rows(rng, n_gallery, 64)
    queries = gallery[:25] + 0.005 * _unit_rows(rng, 25, 64)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    kwargs = {} if budget is None else {"memory_budget_bytes": budget}
    if budget is not None:
        assert (
            knn.plan_scoring(25, n_gallery, 64, 2, memory_budget_bytes=budget).gallery_tile < 2000
        )
    got = np.asarray(knn.knn_distances(gallery, queries, 2, **kwargs))
    want = _brute_force(gallery, queries, 2)
    assert want[:, 0].max() < 1e-3
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_traceable_scores_match_and_export_with_symbolic_queries():
    from jax import export

    rng = np.random.default_rng(13)
    gallery, queries = _unit_rows(rng, 300, 16), _unit_rows(rng, 11, 16)
    want = np.asarray(knn.knn_scores(gallery, queries, 3))
    np.testing.assert_allclose(want, _brute_force(gallery, queries, 3).sum(1), rtol=2e-6)
    traced = jax.jit(lambda q: knn.knn_scores_traceable(gallery, q, 3))
    np.testing.assert_allclose(np.asarray(traced(queries)), want, rtol=1e-6)
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("q, 16"), np.float32)
    exported = export.deserialize(export.export(traced)(spec).serialize())
    for rows in (1, 11):
        got = np.asarray(exported.call(queries[:rows]))
        np.testing.assert_allclose(got, want[:rows], rtol=1e-6)
