"""Host batching and device prefetch; the multi-device part runs on 8 fake CPU devices."""

import itertools

import jax
import numpy as np
import pytest
from multidevice import run_on_devices

from msad_jax.data import (
    epoch_permutation,
    eval_batches,
    prefetch_to_device,
    steps_per_epoch,
    train_batches,
)


def indexed_images(n: int, size: int = 4) -> np.ndarray:
    """Image i holds i in its pixels (high byte in channel 0, low byte in channel 1)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0] = (np.arange(n) // 256)[:, None, None]
    images[..., 1] = (np.arange(n) % 256)[:, None, None]
    return images


def ids(batch) -> np.ndarray:
    image = batch["image"].reshape(-1, *batch["image"].shape[2:])
    return image[:, 0, 0, 0].astype(int) * 256 + image[:, 0, 0, 1]


def masked_ids(batch) -> np.ndarray:
    return ids(batch)[batch["mask"].reshape(-1)]


def test_epoch_covers_every_image_once_with_a_padded_masked_last_batch():
    n, gbs, dev = 1000, 64, 4
    batches = list(
        train_batches(indexed_images(n), global_batch_size=gbs, num_devices=dev, seed=0, epoch=0)
    )
    assert len(batches) == steps_per_epoch(n, gbs) == -(-n // gbs)
    for b in batches:
        assert b["image"].shape == (dev, gbs // dev, 4, 4, 3) and b["image"].dtype == np.uint8
        assert b["mask"].shape == (dev, gbs // dev) and b["mask"].dtype == bool
    seen = np.concatenate([masked_ids(b) for b in batches])
    assert sorted(seen.tolist()) == list(range(n))
    last = batches[-1]
    assert last["mask"].sum() == n - (len(batches) - 1) * gbs
    assert last["mask"].reshape(-1)[: last["mask"].sum()].all()  # real examples first
    # padding holds copies of real images, never garbage
    assert set(ids(last).tolist()) <= set(masked_ids(last).tolist())
    assert all(b["mask"].all() for b in batches[:-1])


def test_order_depends_on_seed_and_epoch_only():
    images = indexed_images(300)
    kw = dict(global_batch_size=32, num_devices=2)

    def order(seed, epoch):
        return np.concatenate(
            [masked_ids(b) for b in train_batches(images, seed=seed, epoch=epoch, **kw)]
        )

    np.testing.assert_array_equal(order(1, 2), order(1, 2))
    np.testing.assert_array_equal(order(1, 2), epoch_permutation(300, 1, 2))
    assert not np.array_equal(order(1, 2), order(1, 3))
    assert not np.array_equal(order(1, 2), order(2, 2))


def test_restart_mid_epoch_continues_the_same_batches():
    images = indexed_images(500)
    kw = dict(global_batch_size=48, num_devices=4, seed=7, epoch=3)
    full = list(train_batches(images, **kw))
    resumed = list(train_batches(images, start_step=5, **kw))
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("make", ["train", "eval"])
def test_process_slices_reassemble_the_global_batch(make):
    images = indexed_images(203)
    common = dict(global_batch_size=24, num_devices=2)
    if make == "train":
        common.update(seed=3, epoch=1)
        fn = train_batches
    else:
        fn = eval_batches
    single = list(fn(images, **{**common, "num_devices": 6}))
    per_process = [list(fn(images, process_index=p, process_count=3, **common)) for p in range(3)]
    for step, whole in enumerate(single):
        parts = [per_process[p][step] for p in range(3)]
        glued_ids = np.concatenate([ids(p) for p in parts])
        glued_mask = np.concatenate([p["mask"].reshape(-1) for p in parts])
        np.testing.assert_array_equal(glued_mask, whole["mask"].reshape(-1))
        np.testing.assert_array_equal(glued_ids[glued_mask], masked_ids(whole))
        assert parts[0]["image"].shape[:2] == (2, 4)


def test_eval_batches_keep_the_order():
    images = indexed_images(50)
    batches = list(eval_batches(images, global_batch_size=16, num_devices=2))
    assert len(batches) == 4
    np.testing.assert_array_equal(np.concatenate([masked_ids(b) for b in batches]), np.arange(50))


def test_bad_batch_arguments_are_explained():
    images = indexed_images(10)
    with pytest.raises(ValueError, match="divisible"):
        next(train_batches(images, global_batch_size=10, num_devices=4, seed=0, epoch=0))
    with pytest.raises(ValueError, match="start_step"):
        next(
            train_batches(images, global_batch_size=4, num_devices=1, seed=0, epoch=0, start_step=9)
        )
    with pytest.raises(ValueError, match="process_index"):
        next(
            eval_batches(
                images, global_batch_size=4, num_devices=1, process_index=2, process_count=2
            )
        )


def test_prefetch_is_lazy_and_preserves_batches():
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield {"x": np.full((1, 3), i, np.int32)}

    stream = prefetch_to_device(source(), size=2)
    first = next(stream)
    assert isinstance(first["x"], jax.Array)
    np.testing.assert_array_equal(np.asarray(first["x"]), [[0, 0, 0]])
    assert len(pulled) <= 3  # only `size` batches ahead
    np.testing.assert_array_equal(np.asarray(next(stream)["x"]), [[1, 1, 1]])


def test_prefetch_feeds_pmap_on_eight_devices():
    result = run_on_devices(
        """
        import json
        import jax, jax.numpy as jnp, numpy as np
        from msad_jax.data import train_batches, prefetch_to_device
        n_dev = jax.local_device_count()
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (100, 5, 5, 3), dtype=np.uint8)
        step = jax.pmap(lambda b: jnp.sum(jnp.where(b["mask"][:, None, None, None],
                                                    b["image"].astype(jnp.int32), 0)))
        host = list(train_batches(images, global_batch_size=32, num_devices=n_dev, seed=0,
                                  epoch=0))
        ok, shardings = [], []
        for hb, db in zip(host, prefetch_to_device(iter(host), size=2)):
            shardings.append(len(db["image"].sharding.device_set))
            got = np.asarray(jax.block_until_ready(step(db)))
            want = [int(np.sum(hb["image"][d][hb["mask"][d]].astype(np.int64)))
                    for d in range(n_dev)]
            ok.append(got.tolist() == want)
        print(json.dumps(dict(n_dev=n_dev, ok=ok, shardings=shardings)))
        """,
        devices=8,
        timeout=300,
    )
    assert result["n_dev"] == 8
    assert len(result["ok"]) == 4 and all(result["ok"])
    assert set(result["shardings"]) == {8}
