"""Host batching: shuffled uint8 training batches, ordered evaluation batches, device prefetch.

A host batch is a dict of numpy arrays with a leading local-device axis::

    {'image': uint8 [num_devices, b, H, W, 3], 'mask': bool [num_devices, b]}

``mask`` is False for padding. A global batch of ``global_batch_size`` examples is cut into
``process_count`` equal consecutive slices (one per host process, multi-host) and each slice into
``num_devices`` equal per-device batches ``b = global_batch_size / (process_count * num_devices)``.

Training order: epoch ``e`` of seed ``s`` uses the permutation
``numpy.random.default_rng([s, e]).permutation(n)`` (PCG64 seeded by a SeedSequence: the same
on every machine and numpy version that keeps PCG64's stream), so restarting at ``start_step``
gives exactly the batches that an uninterrupted run would have produced from that step on. The
last short batch is kept, padded and masked (the reference keeps it, SPEC §5); padding slots hold
copies of the batch's first example so no all-zero images reach the model.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    """Number of batches per epoch with the last short batch kept: ``ceil(n / batch)``."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be positive.")
    return math.ceil(n / global_batch_size)


def epoch_mean_loss(losses: Sequence[float], counts: Sequence[float]) -> float:
    """Mean of the step losses weighted by their batch sizes (the last short batch counts less).

    Equals the mean loss per example over the epoch, the statistic of the reference.
    """
    if len(losses) != len(counts) or not len(losses):
        raise ValueError(f"Need as many losses ({len(losses)}) as counts ({len(counts)}), > 0.")
    weights = np.asarray(counts, np.float64)
    return float(np.sum(np.asarray(losses, np.float64) * weights) / np.sum(weights))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch`` (deterministic in seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def _check_division(global_batch_size: int, num_devices: int, process_count: int) -> int:
    per = num_devices * process_count
    if num_devices < 1 or process_count < 1 or global_batch_size % per:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by num_devices={num_devices}"
            f" x process_count={process_count}; choose a multiple of {per}."
        )
    return global_batch_size // per


def _slice_batch(
    images: np.ndarray,
    indices: np.ndarray,
    *,
    global_batch_size: int,
    num_devices: int,
    process_index: int,
    process_count: int,
) -> dict[str, np.ndarray]:
    """This process's part of one global batch made of ``indices`` (padded to full size)."""
    per_device = _check_division(global_batch_size, num_devices, process_count)
    padded = np.full(global_batch_size, -1, dtype=np.int64)
    padded[: len(indices)] = indices
    local = padded.reshape(process_count, num_devices * per_device)[process_index]
    mask = local >= 0
    fill = indices[0] if len(indices) else 0
    image = images[np.where(mask, local, fill)]
    return {
        "image": image.reshape(num_devices, per_device, *images.shape[1:]),
        "mask": mask.reshape(num_devices, per_device),
    }


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )


def train_batches(
    images: np.ndarray,
    *,
    global_batch_size: int,
    num_devices: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled training batches (see the module doc for the format).

    Args:
      images: uint8 ``[n, H, W, 3]`` normal training images.
      global_batch_size: examples per step over all devices of all processes.
      num_devices: devices this process feeds (``jax.local_device_count()``).
      seed: shuffling seed.
      epoch: epoch number (the permutation depends on it).
      start_step: first step to yield (resume in the middle of an epoch).
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Yields:
      ``steps_per_epoch(n, global_batch_size) - start_step`` host batches.
    """
    _check_division(global_batch_size, num_devices, process_count)
    _check_process(process_index, process_count)
    n = len(images)
    steps = steps_per_epoch(n, global_batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} outside the epoch's {steps} steps.")
    order = epoch_permutation(n, seed, epoch)
    for step in range(start_step, steps):
        chunk = order[step * global_batch_size : (step + 1) * global_batch_size]
        yield _slice_batch(
            images,
            chunk,
            global_batch_size=global_batch_size,
            num_devices=num_devices,
            process_index=process_index,
            process_count=process_count,
        )


def eval_batches(
    images: np.ndarray,
    *,
    global_batch_size: int,
    num_devices: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields all ``images`` in order, the last batch padded and masked.

    Concatenating the masked-in examples of all processes' batches, batch by batch, in process
    order, gives ``images`` in its original order.
    """
    _check_division(global_batch_size, num_devices, process_count)
    _check_process(process_index, process_count)
    n = len(images)
    for step in range(steps_per_epoch(n, global_batch_size)):
        chunk = np.arange(step * global_batch_size, min(n, (step + 1) * global_batch_size))
        yield _slice_batch(
            images,
            chunk,
            global_batch_size=global_batch_size,
            num_devices=num_devices,
            process_index=process_index,
            process_count=process_count,
        )


def shard_to_devices(batch: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Puts each leaf ``[num_devices, ...]`` onto ``devices`` (default: the local devices).

    The result is a ``jax.Array`` sharded along its leading axis, one slice per device, which
    ``jax.pmap`` consumes without a copy (``jax.device_put_sharded`` no longer exists).
    """
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] != len(devices):
            raise ValueError(
                f"Leading axis {x.shape[0]} of a batch leaf must equal the {len(devices)} devices."
            )
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, batch)


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, devices: Sequence[jax.Device] | None = None
) -> Iterator[Any]:
    """Keeps ``size`` batches in flight on the devices while the caller computes.

    Args:
      iterator: host batches with a leading device axis (e.g. from :func:`train_batches`).
      size: number of batches transferred ahead (2 overlaps one step with one transfer).
      devices: target devices (default ``jax.local_devices()``, pmap's order).

    Yields:
      The batches as device-sharded ``jax.Array`` pytrees, in order.
    """
    queue: collections.deque = collections.deque()
    iterator = iter(iterator)

    def enqueue(count: int) -> None:
        for batch in itertools.islice(iterator, count):
            queue.append(shard_to_devices(batch, devices))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
