"""Checkpoint integrity: digests, damage found whatever the storage format, moving aside."""

import hashlib
import json
import os

import numpy as np
import optax
import pytest

from msad_jax.checkpointing import (
    DIGEST_KEY,
    CheckpointError,
    DamagedCheckpointError,
    RunCheckpoints,
    tree_digest,
)


def _state(seed: int = 0, *, size: int = 4096) -> dict:
    """A small checkpoint-shaped state whose optimizer state holds namedtuples (like optax's)."""
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.normal(size=(size,)).astype(np.float32)}}
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    return {
        "params": params,
        "batch_stats": {"bn": {"mean": rng.normal(size=(8,)).astype(np.float32)}},
        "opt_state": opt_state,
        "step": np.asarray(3, np.int32),
        "rng": np.asarray([1, 2], np.uint32),
        "center": rng.normal(size=(16,)).astype(np.float32),
    }


def _saved(tmp_path, state, step=3, **kwargs) -> RunCheckpoints:
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", asynchronous=False, **kwargs)
    checkpoints.save(step, state, {"epoch": 1})
    checkpoints.wait()
    return checkpoints


def _largest_data_file(folder) -> str:
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(folder, "state"))
        for name in names
        if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep
    ]
    return max(files, key=os.path.getsize)


def _reference_digest(tree_leaves: list[tuple[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name, array in sorted(tree_leaves, key=lambda item: item[0]):
        digest.update(f"{name}|{array.dtype.str}|{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_digest_is_over_named_leaves_and_ignores_container_types():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.asarray(7, np.int32)
    as_tuple = {"x": (a, b)}
    as_dict = {"x": {"0": a, "1": b}}
    expected = _reference_digest([("x/0", a), ("x/1", b)])
    assert tree_digest(as_tuple) == tree_digest(as_dict) == expected
    changed = a.copy()
    changed[1, 2] += 1
    assert tree_digest({"x": (changed, b)}) != expected
    assert tree_digest({"x": (a.astype(np.float64), b)}) != expected


def test_restore_returns_what_was_saved_and_the_digest_matches(tmp_path):
    state = _state()
    checkpoints = _saved(tmp_path, state)
    restored, progress = checkpoints.restore(state)
    assert progress == {"epoch": 1}  # the digest entry is not handed back
    assert tree_digest(restored) == tree_digest(state)
    plain = checkpoints.restore_arrays()
    np.testing.assert_array_equal(
        plain["params"]["conv"]["kernel"], state["params"]["conv"]["kernel"]
    )
    # Without a template the optimizer's namedtuples come back as plain containers: same digest.
    assert tree_digest(plain) == tree_digest(state)
    checkpoints.close()


def test_save_copies_the_arrays_so_later_changes_do_not_reach_the_file(tmp_path):
    state = _state()
    kernel = state["params"]["conv"]["kernel"]
    original = kernel.copy()
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", asynchronous=True)
    checkpoints.save(3, state, {"epoch": 1})
    kernel[:] = 0.0  # the caller reuses its buffer while the write may still be running
    checkpoints.wait()
    restored, _ = checkpoints.restore(state)
    np.testing.assert_array_equal(restored["params"]["conv"]["kernel"], original)
    checkpoints.close()


def test_overwritten_bytes_in_a_data_file_are_damage(tmp_path):
    state = _state(size=65536)
    checkpoints = _saved(tmp_path, state)
    path = _largest_data_file(checkpoints.folder(3))
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    with open(path, "wb") as handle:
        handle.write(data)
    with pytest.raises(DamagedCheckpointError) as err:
        checkpoints.restore(state)
    assert err.value.folder == checkpoints.folder(3) and err.value.step == 3
    assert str(err.value).startswith(f"Checkpoint {checkpoints.folder(3)} is damaged")
    assert "\n" not in str(err.value)
    with pytest.raises(DamagedCheckpointError):
        checkpoints.restore_arrays()
    checkpoints.close()


def test_valid_files_with_other_values_are_caught_by_the_digest(tmp_path):
    """Damage the storage format cannot see: readable arrays that are not the ones saved."""
    import shutil

    state, other = _state(0), _state(1)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", asynchronous=False, max_to_keep=3)
    checkpoints.save(3, state, {"epoch": 1})
    checkpoints.save(4, other, {"epoch": 2})
    checkpoints.wait()
    shutil.rmtree(os.path.join(checkpoints.folder(3), "state"))
    shutil.copytree(
        os.path.join(checkpoints.folder(4), "state"), os.path.join(checkpoints.folder(3), "state")
    )
    with pytest.raises(DamagedCheckpointError, match="differ from the sha256 digest"):
        checkpoints.restore(state, 3)
    with pytest.raises(DamagedCheckpointError, match="differ from the sha256 digest"):
        checkpoints.restore_arrays(3)
    restored, _ = checkpoints.restore(state, 4)  # the intact one is still fine
    assert tree_digest(restored) == tree_digest(other)
    checkpoints.close()


def test_garbage_files_are_damage_and_keep_their_cause(tmp_path):
    state = _state()
    checkpoints = _saved(tmp_path, state)
    for root, _, names in os.walk(os.path.join(checkpoints.folder(3), "state")):
        for name in names:
            with open(os.path.join(root, name), "wb") as handle:
                handle.write(b"garbage")
    with pytest.raises(DamagedCheckpointError) as err:
        checkpoints.restore(state)
    assert err.value.__cause__ is not None  # the storage layer's own error is kept
    checkpoints.close()


def test_non_finite_parameters_are_damage_even_with_a_matching_digest(tmp_path):
    state = _state()
    state["params"]["conv"]["kernel"][5] = np.nan
    checkpoints = _saved(tmp_path, state)
    with pytest.raises(DamagedCheckpointError, match="params hold NaN"):
        checkpoints.restore(state)
    checkpoints.close()


def test_a_checkpoint_of_another_model_is_refused_not_damaged(tmp_path):
    checkpoints = _saved(tmp_path, _state(size=4096))
    with pytest.raises(CheckpointError, match="different model or optimizer") as err:
        checkpoints.restore(_state(size=512))
    assert not isinstance(err.value, DamagedCheckpointError)
    checkpoints.close()


def test_damaged_checkpoints_move_aside_without_overwriting(tmp_path):
    state = _state()
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", asynchronous=False, max_to_keep=3)
    for step in (1, 2):
        checkpoints.save(step, state, {"epoch": step})
    checkpoints.wait()
    (tmp_path / "damaged" / "2").mkdir(parents=True)  # an earlier damaged step 2 stays
    moved = checkpoints.move_aside(2, tmp_path / "damaged")
    assert moved == str(tmp_path / "damaged" / "2-2")
    assert os.path.isfile(os.path.join(moved, "state", "_METADATA"))
    assert checkpoints.all_steps() == [1] and checkpoints.latest_step() == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    checkpoints.close()


def test_kept_steps_survive_the_rotation(tmp_path):
    checkpoints = RunCheckpoints(
        tmp_path / "checkpoints", asynchronous=False, max_to_keep=1, keep_steps=(2,)
    )
    for step in (1, 2, 3, 4):
        checkpoints.save(step, _state(step), {"epoch": step})
        checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4]
    checkpoints.close()


def test_checkpoints_of_older_versions_without_a_digest_still_load(tmp_path):
    state = _state()
    checkpoints = _saved(tmp_path, state)
    progress_file = os.path.join(checkpoints.folder(3), "progress", "metadata")
    with open(progress_file) as handle:
        record = json.load(handle)
    assert DIGEST_KEY in record
    del record[DIGEST_KEY]
    with open(progress_file, "w") as handle:
        json.dump(record, handle)
    restored, progress = checkpoints.restore(state)
    assert progress == {"epoch": 1}
    assert tree_digest(restored) == tree_digest(state)
    checkpoints.close()
