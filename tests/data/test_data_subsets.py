import numpy as np

from msad_jax.data.protocols import OneClassData
from msad_jax.data.subsets import subsample


def _problem(n_train=50, per_class=(30, 7, 13)):
    classes = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int32)
    images = np.arange(len(classes), dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 2, 2, 3), np.uint8
    )
    return OneClassData(
        train_images=np.arange(n_train, dtype=np.uint8)[:, None, None, None]
        * np.ones((1, 2, 2, 3), np.uint8),
        test_images=images,
        test_labels=(classes != 0).astype(np.int32),
        test_classes=classes,
        class_names=["a", "b", "c"],
        normal_class=0,
        name="toy",
    )


def test_subsets_are_seeded_ordered_and_stratified():
    data = _problem()
    sub = subsample(data, train_images=10, test_images=25, seed=3)
    assert len(sub.train_images) == 10 and len(sub.test_images) == 25
    ids = sub.train_images[:, 0, 0, 0]
    assert np.all(np.diff(ids) > 0)  # original order kept
    assert set(ids) <= set(range(50))
    # 30/7/13 of 50 scaled to 25 -> 15 / 3.5 / 6.5 -> 15, 4, 6 (remainder to the larger fraction)
    assert np.bincount(sub.test_classes).tolist() == [15, 4, 6]
    assert sub.test_labels.tolist() == (sub.test_classes != 0).astype(int).tolist()
    test_ids = sub.test_images[:, 0, 0, 0]
    np.testing.assert_array_equal(data.test_classes[test_ids], sub.test_classes)
    again = subsample(data, train_images=10, test_images=25, seed=3)
    np.testing.assert_array_equal(again.test_images, sub.test_images)
    other = subsample(data, train_images=10, test_images=25, seed=4)
    assert not np.array_equal(other.train_images, sub.train_images)


def test_zero_or_large_counts_keep_everything():
    data = _problem()
    assert subsample(data) is data
    assert subsample(data, train_images=500, test_images=500) is data
