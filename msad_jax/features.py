"""Feature extraction and the center of the normal features (SPEC §2-3)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msad_jax import distributed
from msad_jax.losses import l2_normalize

PyTree = Any
PreprocessFn = Callable[[jax.Array], jax.Array]
FeatureFn = Callable[[PyTree, dict[str, jax.Array]], dict[str, jax.Array]]


def masked_feature_sum(phi: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of the valid rows of ``phi`` and their count.

    Args:
      phi: ``[b, D]`` float features.
      mask: ``[b]`` bool, False for padding.

    Returns:
      ``(sum [D] float32, count int32 scalar)``.
    """
    mask = jnp.asarray(mask, dtype=bool)
    total = jnp.sum(jnp.where(mask[:, None], phi.astype(jnp.float32), 0.0), axis=0)
    return total, jnp.sum(mask.astype(jnp.int32))


def feature_step(
    model: nn.Module, preprocess_fn: PreprocessFn, *, axis_name: str | None = "batch"
) -> FeatureFn:
    """Per-device feature function ``(variables, batch) -> {'phi', 'sum', 'count'}``.

    Args:
      model: Flax backbone, ``apply(variables, x, train=False) -> [b, D]``.
      preprocess_fn: evaluation preprocessing, ``uint8 [b, H, W, 3] -> float32 [b, S, S, 3]``.
      axis_name: pmap axis over which ``sum`` and ``count`` are reduced; None for no reduction.

    Returns:
      Function mapping this device's batch (``'image'`` and ``'mask'``) to ``phi`` (float32 unit
      rows ``[b, D]``, padding rows included), ``sum`` (float32 ``[D]``) and ``count`` (int32),
      the latter two over the valid rows of all devices.
    """

    def fn(variables: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        feats = model.apply(variables, preprocess_fn(batch["image"]), train=False)
        phi = l2_normalize(feats.astype(jnp.float32))
        total, count = masked_feature_sum(phi, batch["mask"])
        if axis_name is not None:
            total, count = lax.psum((total, count), axis_name)
        return {"phi": phi, "sum": total, "count": count}

    return fn


def make_feature_extractor(
    model: nn.Module, preprocess_fn: PreprocessFn, *, axis_name: str = "batch"
) -> FeatureFn:
    """The pmapped feature function over the local devices.

    Args:
      model: Flax backbone.
      preprocess_fn: evaluation preprocessing (runs on device).
      axis_name: name of the mapped axis.

    Returns:
      The pmapped :func:`feature_step`.
    """
    return jax.pmap(feature_step(model, preprocess_fn, axis_name=axis_name), axis_name=axis_name)


def _eval_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Checks an eval batch and keeps only what the extractor needs."""
    if "image" not in batch or "mask" not in batch:
        raise ValueError(f"eval batch needs 'image' and 'mask', got keys {sorted(batch)}")
    mask = np.asarray(batch["mask"], dtype=bool)
    image = batch["image"]
    n_devices = jax.local_device_count()
    if mask.ndim != 2 or mask.shape[0] != n_devices or tuple(image.shape[:2]) != mask.shape:
        raise ValueError(
            f"eval batch must have a leading device axis of {n_devices}: image "
            f"[{n_devices}, b, H, W, 3] and mask [{n_devices}, b]; got image {tuple(image.shape)} "
            f"and mask {mask.shape}"
        )
    return {"image": image, "mask": mask}


def _run(
    extractor: FeatureFn,
    variables: PyTree,
    batches: Iterable[Mapping[str, Any]],
    group_size: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs the extractor over all batches; returns (features, float64 sum, count)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    chunks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    count = 0
    pending: list[tuple[dict[str, jax.Array], np.ndarray]] = []

    def flush() -> None:
        nonlocal count
        for host, mask in jax.device_get(pending):
            # sum/count are psum-reduced over all devices, hence identical: take device 0's.
            sums.append(np.asarray(host["sum"][0], dtype=np.float64))
            count += int(host["count"][0])
            chunks.append(host["phi"].reshape(-1, host["phi"].shape[-1]))
            masks.append(mask.reshape(-1))
        pending.clear()

    for batch in batches:
        batch = _eval_batch(batch)
        pending.append((extractor(variables, batch), batch["mask"]))
        if len(pending) >= group_size:
            flush()
    flush()
    if not sums:
        raise ValueError("no batches were given; pass a non-empty iterable of eval batches")
    # This process's rows of every batch; with several processes every process gets all rows.
    features = distributed.gather_rows(np.stack(chunks), np.stack(masks))
    return features.astype(np.float32, copy=False), np.sum(sums, axis=0), count


def center_from_sum(total: np.ndarray, count: int, *, normalize: bool = False) -> np.ndarray:
    """Center = total / count, re-normalised to unit length when ``normalize``.

    Args:
      total: ``[D]`` sum of unit-norm features.
      count: number of features summed.
      normalize: re-normalise (when the angular term is used).

    Returns:
      float32 ``[D]``.

    Raises:
      ValueError: if ``count`` is 0.
    """
    if count <= 0:
        raise ValueError("no valid (unpadded) images to average; the center needs at least one")
    center = np.asarray(total, dtype=np.float64) / count
    if normalize:
        center = center / max(float(np.linalg.norm(center)), 1e-12)
    return center.astype(np.float32)


def extract_features(
    extractor: FeatureFn,
    variables: PyTree,
    batches: Iterable[Mapping[str, Any]],
    *,
    group_size: int = 16,
) -> np.ndarray:
    """Unit-norm features phi of every valid image, in input order, padding dropped.

    Args:
      extractor: from :func:`make_feature_extractor`.
      variables: replicated model variables.
      batches: eval batches with a leading device axis.
      group_size: number of batches fetched from the devices at once.

    Returns:
      float32 ``[N, D]``.
    """
    return _run(extractor, variables, batches, group_size)[0]


def extract_features_and_center(
    extractor: FeatureFn,
    variables: PyTree,
    batches: Iterable[Mapping[str, Any]],
    *,
    normalize: bool = False,
    group_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass giving both the features (e.g. the kNN gallery) and their center.

    Args:
      extractor: from :func:`make_feature_extractor`.
      variables: replicated model variables.
      batches: eval batches with a leading device axis.
      normalize: re-normalise the center to unit length.
      group_size: number of batches fetched from the devices at once.

    Returns:
      ``(features float32 [N, D], center float32 [D])``.
    """
    features, total, count = _run(extractor, variables, batches, group_size)
    return features, center_from_sum(total, count, normalize=normalize)
