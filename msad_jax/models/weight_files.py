"""Torch-free reading and writing of weight files (state dicts) as NumPy arrays.

Formats:

* torch checkpoints in both formats ``torch.save`` writes:

  - the zip-based format (the default since torch 1.6): ``<archive>/data.pkl`` plus one
    ``<archive>/data/<key>`` record per storage and an optional ``<archive>/byteorder``;
  - the legacy stream format (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five
    pickles in a row (magic number, protocol version, system-info dict, the saved object, the
    list of storage keys), then for each listed storage its element count (8 bytes) and its raw
    bytes, both little-endian.

  Every pickle is read by a restricted unpickler that only resolves the handful of globals a
  tensor state dict needs; anything else raises :class:`UnsafeCheckpointError` before any code
  from the file runs. torch's even older tar-based format is refused with
  :class:`LegacyCheckpointFormatError`.
* safetensors (own parser and writer; the ``safetensors`` package is not needed).
* ``.npz`` archives (read with ``allow_pickle=False``).

Every loader returns a flat ``dict[str, np.ndarray]`` with torch-style dotted keys. Each array
owns its memory (C-contiguous, native byte order); bfloat16 tensors come back as
``ml_dtypes.bfloat16`` arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from msad_jax.errors import UserError

__all__ = [
    "LegacyCheckpointFormatError",
    "UnknownWeightFormatError",
    "UnsafeCheckpointError",
    "WeightFileError",
    "load_npz",
    "load_safetensors",
    "load_state_dict",
    "load_torch_checkpoint",
    "save_npz",
    "save_safetensors",
    "sha256_file",
]

PathLike = str | os.PathLike


class WeightFileError(UserError, ValueError):
    """A weight file is unreadable: corrupt, truncated, malformed or unsupported."""


class UnsafeCheckpointError(WeightFileError):
    """A torch checkpoint's pickle references a global outside the allow-list."""


class LegacyCheckpointFormatError(WeightFileError):
    """A torch checkpoint uses torch's obsolete tar-based format, which is not supported.

    (The later pre-1.6 pickle-stream format *is* supported by :func:`load_torch_checkpoint`.)
    """


class UnknownWeightFormatError(WeightFileError):
    """A file is none of the supported weight formats."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # local file header, empty archive
_SAFETENSORS_MAX_HEADER = 100_000_000

# torch.serialization.MAGIC_NUMBER / PROTOCOL_VERSION: the first two pickles of a legacy stream.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# The magic number as the first pickle writes it: a LONG1 opcode (pickle protocol >= 2, after
# PROTO and maybe a FRAME header) or a text LONG (protocol 1, which has no PROTO opcode).
_LEGACY_MAGIC_BINARY = b"\x8a\x0a" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = b"L%dL\n" % _LEGACY_MAGIC_NUMBER


def _to_native(array: np.ndarray, byteorder: str) -> np.ndarray:
    """Returns ``array`` (whose bytes are in ``byteorder``) reinterpreted in host byte order."""
    if byteorder != sys.byteorder and array.dtype.itemsize > 1:
        return array.byteswap()
    return array


def _read_head(path: Path, size: int = 512) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def _is_legacy_stream(head: bytes) -> bool:
    """True for torch's pre-1.6 pickle-stream format (its first pickle is the magic number)."""
    if head.startswith(_LEGACY_MAGIC_TEXT):
        return True
    return head[:1] == b"\x80" and _LEGACY_MAGIC_BINARY in head[:32]


def _is_torch_tar(head: bytes) -> bool:
    """True for a tar archive: torch's obsolete (pre pickle-stream) checkpoint format."""
    return head[257:262] == b"ustar"


def _tar_message(path: Path) -> str:
    return (
        f"{path}: torch checkpoint in torch's obsolete tar-based format (written by the earliest "
        "torch releases), which this loader does not read; convert it once with torch, only if "
        "you trust its origin: `torch.save(torch.load(old_path, weights_only=False), new_path)`"
    )


# --------------------------------------------------------------------------------------------
# torch checkpoints: objects the restricted unpickler hands to the pickle
# --------------------------------------------------------------------------------------------


class _Sealed:
    """Base of every object the unpickler exposes: pickle's BUILD opcode cannot alter it.

    BUILD (``obj.__setstate__(state)`` or a ``__dict__`` update) on a shared allow-list entry
    would otherwise let one crafted file change how later files are read in the same process.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise WeightFileError(
            f"checkpoint pickle tries to set state on a {type(self).__name__.lstrip('_')} "
            "(pickle BUILD), which torch never writes; the file is corrupt or crafted"
        )


class _StorageType(_Sealed):
    """Stand-in for a ``torch.<Name>Storage`` class: just the element dtype."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return self.name


class _Constructor(_Sealed):
    """An allow-listed rebuild function, wrapped so that BUILD cannot set its attributes."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"torch._utils.{self._fn.__name__}"


class _RebuiltTensor(_Sealed):
    """A tensor rebuilt from a checkpoint.

    ``array`` is ``None`` until the storage's bytes are read when they follow the pickle
    (legacy format).
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None) -> None:
        self.array = array


class _LegacyRoot:
    """A storage of a legacy checkpoint; its bytes follow the pickles, so tensors wait for it.

    Never handed to the pickle itself (only through :class:`_LegacyStorage`).
    """

    __slots__ = ("dtype", "key", "numel", "pending")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        # (tensor, storage (view), storage offset, size, stride) of every tensor on this root.
        self.pending: list[tuple[_RebuiltTensor, _LegacyStorage, int, tuple, tuple]] = []


class _LegacyStorage(_Sealed):
    """A legacy storage record as the pickle sees it: a window of a root storage.

    Elements ``[start, start + numel)`` of ``root``: the whole root, or a storage view.
    """

    __slots__ = ("numel", "root", "start")

    def __init__(self, root: _LegacyRoot, start: int, numel: int) -> None:
        self.root = root
        self.start = start
        self.numel = numel


_TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


def _strided_copy(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """Copies the view ``storage[offset + sum(i_k * stride_k)]`` of shape ``size``."""
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise WeightFileError(f"invalid tensor geometry: offset={offset} size={size}")
    if len(size) != len(stride):
        raise WeightFileError(f"tensor size {size} and stride {stride} differ in length")
    if math.prod(size) == 0:
        try:
            return np.empty(size, dtype=storage.dtype)
        except ValueError as err:  # e.g. (0, 2**70): too many dimensions or too big a shape
            raise WeightFileError(f"invalid tensor size {size} ({err})") from err
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise WeightFileError(
            f"tensor (offset={offset}, size={size}, stride={stride}) reads past the end of "
            f"its storage of {storage.size} elements; the file is corrupt"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * item for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int for v in value):
        raise WeightFileError(f"checkpoint tensor {what} must be a tuple of ints, got {value!r}")
    return value


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _RebuiltTensor:
    """Mirror of ``torch._utils._rebuild_tensor`` (v1, torch < 0.4 files): a strided view.

    A zip checkpoint's storage is already an array and is copied at once; a legacy storage's
    bytes come after the pickle, so the copy is deferred until :func:`_fill_legacy_root`.
    """
    if type(storage_offset) is not int:
        raise WeightFileError(f"checkpoint tensor offset must be an int, got {storage_offset!r}")
    shape = _as_int_tuple(size, "size")
    strides = _as_int_tuple(stride, "stride")
    if isinstance(storage, np.ndarray):
        return _RebuiltTensor(_strided_copy(storage, storage_offset, shape, strides))
    if isinstance(storage, _LegacyStorage):
        tensor = _RebuiltTensor(None)
        storage.root.pending.append((tensor, storage, storage_offset, shape, strides))
        return tensor
    raise WeightFileError("checkpoint tensor is not backed by a storage record")


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _RebuiltTensor:
    """Mirror of ``torch._utils._rebuild_tensor_v2`` producing an owned numpy array."""
    del requires_grad, backward_hooks, metadata  # no meaning for plain arrays
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None
) -> _RebuiltTensor:
    """Mirror of ``torch._utils._rebuild_parameter``: a parameter is just its data."""
    del requires_grad, backward_hooks
    if not isinstance(data, _RebuiltTensor):
        raise WeightFileError("checkpoint parameter does not wrap a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> _RebuiltTensor:
    """Mirror of ``torch._utils._rebuild_parameter_with_state``; Python attributes are dropped."""
    del state
    return _rebuild_parameter(data, requires_grad, backward_hooks)


# Storage classes: ``torch.<Name>Storage`` and, in files saved from a GPU by torch < 1.12 or so,
# ``torch.cuda.<Name>Storage`` (torch's own loaders map both to a dtype by name alone).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Constructor(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Constructor(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Constructor(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Constructor(_rebuild_parameter_with_state),
    **{
        (module, name): _StorageType(name, dtype)
        for module in ("torch", "torch.cuda")
        for name, dtype in _TORCH_STORAGE_DTYPES.items()
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; storages come from ``resolve_storage``.

    Args:
        file: Binary stream positioned at the pickle; left just after its STOP opcode.
        resolve_storage: Maps a persistent id to a storage; ``None`` for pickles without any.
    """

    def __init__(self, file: BinaryIO, resolve_storage: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for Python 2 strings
        self._resolve_storage = resolve_storage

    def find_class(self, module: str, name: str) -> Any:
        """Returns the stand-in for an allow-listed global; refuses everything else."""
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if (module in ("torch", "torch.cuda") and name.endswith("Storage")) or (
            module == "torch._utils"
        ):
            raise WeightFileError(
                f"checkpoint uses `{module}.{name}`, a tensor kind or dtype this loader does "
                f"not support (supported storages: {', '.join(_TORCH_STORAGE_DTYPES)}); "
                "convert the tensors to a supported dtype and re-save"
            )
        raise UnsafeCheckpointError(
            f"checkpoint pickle references the forbidden global `{module}.{name}`; refusing to "
            "load it (a state-dict file only needs tensors); re-save a plain state dict with "
            "`torch.save(model.state_dict(), path)` if you trust its origin"
        )

    def persistent_load(self, pid: Any) -> Any:
        """Resolves a storage record through ``resolve_storage``."""
        if self._resolve_storage is None:
            raise WeightFileError(f"unexpected persistent id {pid!r} in a pickle without tensors")
        return self._resolve_storage(pid)


def _unpickle(
    file: BinaryIO, path: Path, what: str, resolve_storage: Callable[[Any], Any] | None = None
) -> Any:
    """Runs the restricted unpickler; every failure becomes a WeightFileError naming ``path``."""
    try:
        return _RestrictedUnpickler(file, resolve_storage).load()
    except WeightFileError as err:
        if str(path) in str(err):
            raise
        raise type(err)(f"{path}: {err}") from err
    except Exception as err:  # malformed or cut-off pickle: any of several builtin exceptions
        raise WeightFileError(
            f"{path}: {what} is not a valid checkpoint pickle or is truncated "
            f"({type(err).__name__}: {err}); re-download or re-save the file"
        ) from err


def _decode_ascii(value: Any) -> Any:
    """Mirror of torch's ``_maybe_decode_ascii`` for record tags written by Python 2."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


# --------------------------------------------------------------------------------------------
# torch zip checkpoints
# --------------------------------------------------------------------------------------------


def _find_archive_prefix(names: list[str], path: Path) -> str:
    """Returns ``'<archive>/'`` for the zip's ``<archive>/data.pkl`` (or ``''`` at the root)."""
    candidates = [
        n[: -len("data.pkl")]
        for n in names
        if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)
    ]
    if not candidates:
        hint = ""
        if names and all(n.endswith(".npy") for n in names):
            hint = " (it looks like an .npz archive: use load_npz or load_state_dict)"
        raise WeightFileError(
            f"{path}: zip archive has no data.pkl, so it is not a torch checkpoint{hint}; "
            "save weights with `torch.save(model.state_dict(), path)`"
        )
    if len(candidates) > 1:
        raise WeightFileError(f"{path}: zip archive holds several data.pkl records {candidates}")
    return candidates[0]


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, EOFError, OSError) as err:  # bad CRC, short data, ...
        raise WeightFileError(
            f"{path}: record {name!r} is corrupt ({err}); re-download or re-save the file"
        ) from err


def _open_zip(path: Path) -> zipfile.ZipFile:
    """Opens a zip archive, turning a truncated or corrupt one into a WeightFileError."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise WeightFileError(
            f"{path}: zip archive is truncated or corrupt ({err}); re-download or re-save the file"
        ) from err


def _load_zip_checkpoint(path: Path) -> Any:
    """Unpickles a zip-based checkpoint's ``data.pkl`` with its storages read from the zip."""
    with _open_zip(path) as archive:
        names = archive.namelist()
        prefix = _find_archive_prefix(names, path)
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = _read_member(archive, f"{prefix}byteorder", path).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise WeightFileError(f"{path}: unknown byteorder record {byteorder!r}")
        storages: dict[str, np.ndarray] = {}
        name_set = set(names)

        def resolve_storage(pid: Any) -> np.ndarray:
            """Resolves ``('storage', type, key, location, numel)`` to a numpy storage."""
            if not (isinstance(pid, tuple) and len(pid) == 5):
                raise WeightFileError(f"unexpected persistent id in checkpoint pickle: {pid!r}")
            typename, storage_type, key, _location, numel = pid
            if _decode_ascii(typename) != "storage" or not isinstance(storage_type, _StorageType):
                raise WeightFileError(f"unexpected persistent id in checkpoint pickle: {pid!r}")
            if not isinstance(key, str) or type(numel) is not int or numel < 0:
                raise WeightFileError(f"malformed storage record in checkpoint pickle: {pid!r}")
            cached = storages.get(key)
            if cached is not None:
                if cached.dtype != storage_type.dtype:
                    raise WeightFileError(
                        f"{path}: storage {key!r} is used with two dtypes "
                        f"({cached.dtype}, {storage_type.dtype}); the file is corrupt"
                    )
                return cached
            record = f"{prefix}data/{key}"
            if record not in name_set:
                raise WeightFileError(
                    f"{path}: missing storage record {record!r}; the checkpoint is incomplete, "
                    "re-download or re-save it"
                )
            raw = _read_member(archive, record, path)
            nbytes = numel * storage_type.dtype.itemsize
            if len(raw) < nbytes:
                raise WeightFileError(
                    f"{path}: storage record {record!r} has {len(raw)} bytes, expected {nbytes}; "
                    "the checkpoint is corrupt, re-download or re-save it"
                )
            array = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
            storages[key] = _to_native(array, byteorder)
            return storages[key]

        pickled = _read_member(archive, f"{prefix}data.pkl", path)
        return _unpickle(io.BytesIO(pickled), path, "data.pkl", resolve_storage)


# --------------------------------------------------------------------------------------------
# torch legacy (pre-1.6) checkpoints
# --------------------------------------------------------------------------------------------


class _LegacyStorages:
    """Resolves a legacy pickle's storage records; remembers every storage it hands out.

    A record is ``('storage', storage_type, root_key, location, numel, view_metadata)`` with
    ``view_metadata`` ``None`` or ``(view_key, offset, numel)``: a slice of the root storage, in
    elements (only old torch versions, which still had storage views, wrote one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.roots: dict[str, _LegacyRoot] = {}
        self._whole: dict[str, _LegacyStorage] = {}
        self._views: dict[str, _LegacyStorage] = {}

    def _bad(self, pid: Any, problem: str) -> WeightFileError:
        return WeightFileError(f"{self.path}: {problem} in checkpoint pickle: {pid!r}")

    def __call__(self, pid: Any) -> _LegacyStorage:
        """Returns the storage (or storage view) a persistent id names."""
        if isinstance(pid, tuple) and pid and _decode_ascii(pid[0]) == "module":
            raise WeightFileError(
                f"{self.path}: checkpoint pickles a whole nn.Module {pid[1:2]!r}, not a state "
                "dict; re-save it with `torch.save(model.state_dict(), path)`"
            )
        if not (isinstance(pid, tuple) and len(pid) == 6):
            raise self._bad(pid, "unexpected persistent id")
        typename, storage_type, key, _location, numel, view = pid
        if _decode_ascii(typename) != "storage" or not isinstance(storage_type, _StorageType):
            raise self._bad(pid, "unexpected persistent id")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise self._bad(pid, "malformed storage record")
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _LegacyRoot(key, storage_type.dtype, numel)
            self._whole[key] = _LegacyStorage(root, 0, numel)
        elif root.dtype != storage_type.dtype or root.numel != numel:
            raise self._bad(
                pid,
                f"storage {key!r} recorded twice with different dtype or size (first "
                f"{root.numel} x {root.dtype})",
            )
        if view is None:
            return self._whole[key]
        return self._view(pid, root, view)

    def _view(self, pid: Any, root: _LegacyRoot, view: Any) -> _LegacyStorage:
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and isinstance(view[0], str)
            and all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise self._bad(pid, "malformed storage view")
        view_key, start, numel = view
        if start + numel > root.numel:
            raise self._bad(
                pid,
                f"storage view [{start}, {start + numel}) outside its {root.numel}-element root",
            )
        cached = self._views.get(view_key)
        if cached is None:
            cached = self._views[view_key] = _LegacyStorage(root, start, numel)
        elif (cached.root, cached.start, cached.numel) != (root, start, numel):
            raise self._bad(pid, f"storage view {view_key!r} recorded twice, differently")
        return cached


def _check_storage_keys(keys: Any, roots: Mapping[str, _LegacyRoot], path: Path) -> list[str]:
    """Validates the pickled list of storage keys against the storages the tensors use."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightFileError(f"{path}: legacy checkpoint's storage key list is malformed")
    if len(set(keys)) != len(keys):
        raise WeightFileError(f"{path}: legacy checkpoint lists a storage key twice")
    missing = sorted(set(roots) - set(keys))
    unused = sorted(set(keys) - set(roots))
    if missing or unused:
        raise WeightFileError(
            f"{path}: legacy checkpoint's storage key list does not match its tensors "
            f"(without data: {missing[:5]}, unused: {unused[:5]}); the file is corrupt"
        )
    return keys


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True if ``stride`` is the row-major layout of ``size`` (strides of length-1 dims ignored)."""
    expected = 1
    for n, s in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _sole_whole_tensor(root: _LegacyRoot) -> tuple[_RebuiltTensor, tuple[int, ...]] | None:
    """The only tensor on ``root`` and its shape, if it is the whole storage in row-major order."""
    if len(root.pending) != 1:
        return None
    tensor, storage, offset, size, stride = root.pending[0]
    whole = storage.start == 0 and storage.numel == root.numel and offset == 0
    shape_ok = len(size) == len(stride) and all(n >= 0 for n in size)
    if whole and shape_ok and math.prod(size) == root.numel and _is_c_contiguous(size, stride):
        return tensor, size
    return None  # the general path (and its geometry checks) handles everything else


def _fill_legacy_root(file: BinaryIO, root: _LegacyRoot, file_size: int, path: Path) -> None:
    """Reads one storage (count + little-endian bytes) and gives its tensors their arrays.

    The common case of one tensor spanning its whole storage reads straight into that tensor's
    array; otherwise every tensor is copied out of the storage.
    """
    count_bytes = file.read(8)
    if len(count_bytes) < 8:
        raise WeightFileError(
            f"{path}: file ends before the data of storage {root.key!r}; the file is truncated, "
            "re-download or re-save it"
        )
    count = int.from_bytes(count_bytes, "little", signed=True)
    if count != root.numel:
        raise WeightFileError(
            f"{path}: storage {root.key!r} has {count} elements on disk, its record says "
            f"{root.numel}; the file is corrupt"
        )
    nbytes = root.numel * root.dtype.itemsize
    remaining = file_size - file.tell()
    if nbytes > remaining:
        raise WeightFileError(
            f"{path}: storage {root.key!r} needs {nbytes} bytes but only {remaining} remain; "
            "the file is truncated, re-download or re-save it"
        )
    sole = _sole_whole_tensor(root)
    array = np.empty(root.numel if sole is None else sole[1], dtype=root.dtype)
    if file.readinto(array.reshape(-1).view(np.uint8)) != nbytes:
        raise WeightFileError(f"{path}: short read in storage {root.key!r}; the file is truncated")
    array = _to_native(array, "little")  # torch writes legacy storages little-endian
    if sole is not None:
        sole[0].array = array
    for tensor, storage, offset, size, stride in root.pending if sole is None else ():
        window = array[storage.start : storage.start + storage.numel]
        try:
            tensor.array = _strided_copy(window, offset, size, stride)
        except WeightFileError as err:
            raise WeightFileError(f"{path}: storage {root.key!r}: {err}") from err
    root.pending.clear()


def _load_legacy_checkpoint(path: Path) -> Any:
    """Reads torch's pre-1.6 pickle stream (see ``torch.serialization._legacy_load``).

    The system-info pickle's ``little_endian`` flag is not consulted, as in torch: torch writes
    the element counts and storage bytes of this format little-endian on every host.
    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        magic = _unpickle(f, path, "the magic-number pickle")
        if type(magic) is not int or magic != _LEGACY_MAGIC_NUMBER:
            raise WeightFileError(f"{path}: bad magic number, so not a torch legacy checkpoint")
        version = _unpickle(f, path, "the protocol-version pickle")
        if type(version) is not int or version != _LEGACY_PROTOCOL_VERSION:
            raise WeightFileError(
                f"{path}: torch legacy checkpoint of protocol version {version!r}, expected "
                f"{_LEGACY_PROTOCOL_VERSION}; the file is corrupt"
            )
        if not isinstance(_unpickle(f, path, "the system-info pickle"), dict):
            raise WeightFileError(f"{path}: torch legacy checkpoint's system info is not a dict")
        storages = _LegacyStorages(path)
        obj = _unpickle(f, path, "the checkpoint pickle", storages)
        keys = _unpickle(f, path, "the storage-key pickle")
        for key in _check_storage_keys(keys, storages.roots, path):
            _fill_legacy_root(f, storages.roots[key], file_size, path)
    return obj


# --------------------------------------------------------------------------------------------
# torch checkpoints: the public loader
# --------------------------------------------------------------------------------------------


def _collect_arrays(obj: Any, prefix: str, out: dict[str, np.ndarray], active: set[int]) -> None:
    """Flattens nested mappings into ``out`` with dotted keys; drops non-tensor leaves."""
    if isinstance(obj, _RebuiltTensor):
        if prefix in out:
            raise WeightFileError(f"checkpoint has the key {prefix!r} twice after flattening")
        if obj.array is None:  # unreachable: every legacy storage is read or an error raised
            raise WeightFileError(f"checkpoint tensor {prefix!r} has no data")
        out[prefix] = obj.array
        return
    if not isinstance(obj, Mapping):
        return  # ints, strings, lists, None...: not weights
    if id(obj) in active:
        raise WeightFileError("checkpoint holds a self-referencing dict")
    active.add(id(obj))
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightFileError(f"checkpoint dict key {key!r} is not a string")
        _collect_arrays(value, f"{prefix}.{key}" if prefix else key, out, active)
    active.discard(id(obj))


def _select_state_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors "
            "(save `model.state_dict()`)"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    out: dict[str, np.ndarray] = {}
    try:
        _collect_arrays(obj, "", out, set())
    except WeightFileError as err:
        raise WeightFileError(f"{path}: {err}") from err
    if not out:
        raise WeightFileError(f"{path}: checkpoint contains no tensors")
    return out


def load_torch_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a torch checkpoint (``torch.save``, any torch version since 2017) without torch.

    Both formats are read: the zip-based one (torch >= 1.6) and the legacy pickle stream
    (torch < 1.6, or ``_use_new_zipfile_serialization=False``), told apart by content. Every
    pickle goes through a restricted unpickler: only ``collections.OrderedDict``,
    ``torch._utils._rebuild_tensor[_v2]``, ``torch._utils._rebuild_parameter[_with_state]`` and
    the storage classes ``torch[.cuda].{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,
    Bool}Storage`` are resolved (to torch-free stand-ins that pickle cannot modify); any other
    global raises :class:`UnsafeCheckpointError` and nothing from the file is executed.

    Structure of the result:

    * If the file holds a dict with a ``'state_dict'`` (else ``'model'``) entry that is itself a
      dict, that inner dict is used (the common ``{'state_dict': sd, 'epoch': ...}`` wrapper).
    * Nested dicts are flattened with dotted keys (``{'a': {'b': t}}`` -> ``'a.b'``), so a plain
      torch state dict keeps its keys unchanged.
    * Tensor leaves (including ``num_batches_tracked`` and parameters) become numpy arrays that
      own their memory, honouring storage offset, size and stride (and, in legacy files from
      torch < 1.0, storage views); tensors sharing one storage are copied independently.
      Non-tensor leaves (ints, strings, lists, None) are dropped.

    Args:
        path: The checkpoint file.

    Returns:
        Dotted name -> array (float32/float16/bfloat16/float64/int64/int32/int16/int8/uint8/bool).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: A pickle references a forbidden global (e.g. ``os.system``).
        LegacyCheckpointFormatError: The file uses torch's obsolete tar-based format.
        WeightFileError: Empty, truncated or corrupt file, not a torch checkpoint, zip without
            ``data.pkl``, missing or short storage data, unsupported dtype, or no tensors.
    """
    path = Path(path)
    head = _read_head(path)
    if not head:
        raise WeightFileError(f"{path}: file is empty; re-download or re-save it")
    if head[:4] in _ZIP_MAGICS:
        obj = _load_zip_checkpoint(path)
    elif _is_legacy_stream(head):
        obj = _load_legacy_checkpoint(path)
    elif _is_torch_tar(head):
        raise LegacyCheckpointFormatError(_tar_message(path))
    else:
        raise WeightFileError(
            f"{path}: not a torch checkpoint: neither a zip archive (torch>=1.6) nor torch's "
            "legacy pickle stream; pass a file written by `torch.save(model.state_dict(), "
            "path)` (or use load_state_dict for other formats)"
        )
    return _select_state_dict(obj, path)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": _BFLOAT16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES: dict[np.dtype, str] = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _parse_safetensors_entry(
    name: str, entry: Any, buffer_len: int, path: Path
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    def bad(problem: str) -> WeightFileError:
        return WeightFileError(f"{path}: safetensors header entry {name!r}: {problem}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("must be an object with exactly 'dtype', 'shape' and 'data_offsets'")
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"unsupported dtype {entry['dtype']!r} (supported: {list(_SAFETENSORS_DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= buffer_len
    ):
        raise bad(f"data_offsets {offsets!r} do not lie within the {buffer_len}-byte data buffer")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(
            f"data_offsets {offsets!r} span {offsets[1] - offsets[0]} bytes, shape needs {nbytes}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file (own parser; the ``safetensors`` package is not needed).

    The header is validated strictly: known dtypes only, shapes match byte spans, and the
    tensors' byte ranges tile the data buffer exactly (no gaps, overlaps or trailing bytes).
    ``__metadata__`` is ignored.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        Tensor name -> array owning its memory, in header order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightFileError: Truncated file, malformed header, or inconsistent offsets.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise WeightFileError(
            f"{path}: {len(data)} bytes is too short for a safetensors file (truncated?)"
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _SAFETENSORS_MAX_HEADER):
        raise WeightFileError(
            f"{path}: safetensors header length {header_len} exceeds the file "
            f"({len(data)} bytes); the file is truncated or not safetensors"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightFileError(f"{path}: safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    buffer = memoryview(data)[8 + header_len :]
    entries = [
        (name, *_parse_safetensors_entry(name, entry, len(buffer), path))
        for name, entry in header.items()
    ]
    expected_start = 0
    for name, _, _, start, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if start != expected_start:
            raise WeightFileError(
                f"{path}: tensor {name!r} starts at byte {start}, expected {expected_start} "
                "(overlapping or gapped data_offsets)"
            )
        expected_start = end
    if expected_start != len(buffer):
        raise WeightFileError(
            f"{path}: tensors cover {expected_start} of {len(buffer)} data bytes; "
            "the file is corrupt"
        )
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, start, end in entries:
        flat = np.frombuffer(buffer[start:end], dtype=dtype)
        out[name] = np.array(_to_native(flat, "little").reshape(shape), copy=True)
    return out


def _checked_arrays(
    tensors: Mapping[str, Any], allowed: Callable[[np.dtype], bool], fmt: str, hint: str = ""
) -> dict[str, np.ndarray]:
    """Validates names and dtypes; returns C-contiguous native arrays."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{fmt} tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value, order="C")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not allowed(array.dtype):
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which {fmt} cannot store; "
                "cast it (e.g. to float32) first" + hint
            )
        arrays[name] = array
    return arrays


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Writes via a temporary file in the same folder, then renames over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(
    tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes arrays to a safetensors file (sorted by name, header padded to 8 bytes).

    Args:
        tensors: Name -> array-like of a dtype in F32/F16/BF16/F64/I64/I32/I16/I8/U64/U32/U16/
            U8/BOOL (bfloat16 as ``ml_dtypes.bfloat16``).
        path: Destination; replaced atomically.
        metadata: Optional ``__metadata__`` (string -> string).

    Raises:
        ValueError: Unsupported dtype, bad name (e.g. ``'__metadata__'``) or non-string metadata.
    """
    path = Path(path)
    arrays = _checked_arrays(tensors, lambda d: d in _SAFETENSORS_NAMES, "safetensors")
    if "__metadata__" in arrays:
        raise ValueError("'__metadata__' is reserved in safetensors; rename that tensor")
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(arrays):
        nbytes = arrays[name].nbytes
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[arrays[name].dtype],
            "shape": list(arrays[name].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(f: Any) -> None:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in sorted(arrays):
            f.write(_to_native(arrays[name], "little").tobytes())

    _atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _npz_dtype_ok(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf" and dtype.type is not np.longdouble


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` archive with ``allow_pickle=False``.

    Args:
        path: The ``.npz`` file.

    Returns:
        Member name (without ``.npy``) -> array, bool/int/uint/float dtypes only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightFileError: Not a readable npz, or a member holds objects/void/strings.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise WeightFileError(f"{path}: holds a single .npy array, not an .npz archive")
        with loaded:
            out = {name: np.array(loaded[name], copy=True) for name in loaded.files}
    except (zipfile.BadZipFile, EOFError) as err:
        raise WeightFileError(f"{path}: npz archive is truncated or corrupt ({err})") from err
    except ValueError as err:
        if isinstance(err, WeightFileError):
            raise
        raise WeightFileError(f"{path}: not a plain numeric npz archive ({err})") from err
    for name, array in out.items():
        if not _npz_dtype_ok(array.dtype):
            raise WeightFileError(
                f"{path}: member {name!r} has dtype {array.dtype}; only bool/int/uint/float "
                "arrays are weights (bfloat16 does not survive npz; use safetensors)"
            )
    return out


def save_npz(tensors: Mapping[str, Any], path: PathLike) -> None:
    """Writes arrays to an uncompressed ``.npz`` archive (loadable by ``np.load``).

    Args:
        tensors: Name -> array-like of bool/int/uint/float dtype. bfloat16 is refused because
            ``.npy`` cannot record it (use :func:`save_safetensors`).
        path: Destination; replaced atomically. Written as given (no ``.npz`` suffix added).

    Raises:
        ValueError: Unsupported dtype or bad name.
    """
    path = Path(path)
    arrays = _checked_arrays(
        tensors, _npz_dtype_ok, "npz", hint=" (bfloat16 can be kept with save_safetensors)"
    )

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    _atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# Dispatch and hashing
# --------------------------------------------------------------------------------------------


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a weight file of any supported format, chosen by content (not by suffix).

    Zip archives holding a ``data.pkl`` record and torch's legacy (pre-1.6) pickle streams are
    torch checkpoints (:func:`load_torch_checkpoint`), zip archives of ``.npy`` members are npz
    (:func:`load_npz`); files starting with a little-endian header length followed by ``{`` are
    safetensors (:func:`load_safetensors`).

    Args:
        path: The weight file.

    Returns:
        Dotted name -> array.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LegacyCheckpointFormatError: torch's obsolete tar-based format.
        UnknownWeightFormatError: None of the supported formats.
        WeightFileError: (and subclasses) as raised by the format's loader.
    """
    path = Path(path)
    head = _read_head(path)
    if not head:
        raise WeightFileError(f"{path}: file is empty; re-download or re-save it")
    if _is_legacy_stream(head):
        return load_torch_checkpoint(path)
    if _is_torch_tar(head):
        raise LegacyCheckpointFormatError(_tar_message(path))
    if head[:4] in _ZIP_MAGICS:
        with _open_zip(path) as archive:
            names = archive.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return load_torch_checkpoint(path)
        if names and all(n.endswith(".npy") for n in names):
            return load_npz(path)
        raise UnknownWeightFormatError(
            f"{path}: zip archive is neither a torch checkpoint (no data.pkl) nor an npz "
            f"(members are not all .npy: {names[:5]}); save weights with torch.save, "
            "save_safetensors or save_npz"
        )
    if _looks_like_safetensors(head):
        return load_safetensors(path)
    raise UnknownWeightFormatError(
        f"{path}: unknown weight file format (first bytes {head[:8]!r}); supported: torch "
        "checkpoints (zip-based or legacy), safetensors, npz"
    )


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex SHA-256 of a file, read in ``chunk_size``-byte chunks.

    Args:
        path: The file.
        chunk_size: Bytes per read.

    Returns:
        64 lowercase hex digits (torch hub names carry the first 8).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
