"""Pretrained weights: a registry of files, a local cache, download, verification and conversion.

Weights are looked up, in order, in the msad_jax cache (``cache_dir`` argument, else
``$MSAD_JAX_CACHE``, else ``~/.cache/msad_jax``) and in torch hub's checkpoint folder
(``$TORCH_HOME/hub/checkpoints``, else ``~/.cache/torch/hub/checkpoints``), so files that
torchvision already downloaded are reused. A missing file is downloaded into the msad_jax cache with
a progress bar, unless offline (``offline=True`` or ``MSAD_JAX_OFFLINE=1``), in which case (or
when the download fails) a one-sentence :class:`PretrainedWeightsError` says which file to put
where.

Every file is checked against the sha256 prefix in its name (torch hub's convention) before use, and
the converted Flax variables are cached next to it as ``.npz`` so the ``.pth`` is parsed only once.

Vision Transformer weights come from the Hugging Face Hub (:func:`hub_weights`: the repository's
``resolve`` address, cached as the repository id with ``/`` replaced by ``--``, then ``--`` and
the file name). Their digests are not pinned here: the Hub declares each large file's sha256 in
the ``X-Linked-Etag`` header of the ``resolve`` response, the download is verified against it,
and the digest is kept beside the file (``<file>.sha256``) so that every later use verifies the
cached file again.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np
import tqdm

from msad_jax.errors import UserError
from msad_jax.models import weight_files

_CHUNK = 1 << 20


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights are missing, cannot be downloaded, or fail verification."""


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """Where a backbone's pretrained weights come from.

    Attributes:
      filename: file name in the cache (torch hub style: ``<name>-<sha256 prefix>.pth``).
      url: download address, or None when the file ships inside a Python package.
      sha256_prefix: leading hex digits of the file's sha256, or None to skip the check.
      locate: for weights inside a Python package: returns the file's path (raises
        ``FileNotFoundError`` with install advice when the package is missing).
    """

    filename: str
    url: str | None = None
    sha256_prefix: str | None = None
    locate: Callable[[], pathlib.Path] | None = None


_TORCHVISION = "https://download.pytorch.org/models/"

RESNET_WEIGHTS: dict[str, WeightsFile] = {
    name: WeightsFile(f"{name}-{prefix}.pth", _TORCHVISION + f"{name}-{prefix}.pth", prefix)
    for name, prefix in (
        ("resnet18", "f37072fd"),
        ("resnet34", "b627a593"),
        ("resnet50", "0676ba61"),
        ("resnet101", "63fe2227"),
        ("resnet152", "394f9c45"),
    )
}


_HUB = "https://huggingface.co/"


def hub_weights(
    repo: str, filename: str = "model.safetensors", revision: str = "main"
) -> WeightsFile:
    """A file of a Hugging Face Hub repository (verified against the Hub's declared sha256)."""
    return WeightsFile(
        f"{repo.replace('/', '--')}--{filename}", f"{_HUB}{repo}/resolve/{revision}/{filename}"
    )


#: Vision Transformers: timm's ImageNet-21k -> 1k fine-tuned ViTs (timm layout, inception
#: mean/std) and Meta's DINOv2 backbones (Hugging Face ``Dinov2Model`` layout). Apache-2.0.
HUB_WEIGHTS: dict[str, WeightsFile] = {
    "vit_small_patch16_224": hub_weights("timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "vit_base_patch16_224": hub_weights("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    **{
        f"dinov2_vit{size[0]}14": hub_weights(f"facebook/dinov2-{size}")
        for size in ("small", "base", "large")
    },
    **{
        f"dinov2_vit{size[0]}14_reg": hub_weights(f"facebook/dinov2-with-registers-{size}")
        for size in ("small", "base", "large")
    },
}


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The msad_jax cache: ``cache_dir``, else ``$MSAD_JAX_CACHE``, else ``~/.cache/msad_jax``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("MSAD_JAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/msad_jax").expanduser()


def _torch_hub_dir() -> pathlib.Path:
    torch_home = os.environ.get("TORCH_HOME")
    base = pathlib.Path(torch_home) if torch_home else pathlib.Path("~/.cache/torch").expanduser()
    return base / "hub" / "checkpoints"


def _offline_from_env() -> bool:
    return os.environ.get("MSAD_JAX_OFFLINE", "").lower() in ("1", "true", "yes")


def verify_sha256(path: pathlib.Path, prefix: str | None) -> None:
    """Raises PretrainedWeightsError unless the file's sha256 starts with ``prefix``."""
    if prefix is None:
        return
    digest = weight_files.sha256_file(path)
    if not digest.startswith(prefix):
        raise PretrainedWeightsError(
            f"{path} has sha256 {digest[:16]}..., expected it to start with {prefix}: the file is "
            "corrupt or not the published one; delete it and download it again."
        )


_SHA256_HEADER = "X-Linked-Etag"


def _declared_sha256(value: str | None) -> str | None:
    """The sha256 in an ``X-Linked-Etag`` header value, or None when it holds none."""
    digest = (value or "").strip().removeprefix("W/").strip('"').lower()
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


class _DigestRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects, remembering a sha256 declared by any response on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.sha256: str | None = None

    def note(self, headers: Any) -> None:
        self.sha256 = self.sha256 or _declared_sha256(headers.get(_SHA256_HEADER))

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        """Notes the redirect's headers, then redirects as usual."""
        self.note(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, destination: pathlib.Path, *, timeout: float = 30.0) -> str | None:
    """Downloads ``url`` to ``destination`` atomically, with a progress bar.

    Returns:
      The sha256 that the server declared for the file (``X-Linked-Etag``, as the Hugging Face
      Hub sends it, also on redirects), or None.

    Raises:
      PretrainedWeightsError: when the download fails (e.g. no internet).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    recorder = _DigestRecorder()
    opener = urllib.request.build_opener(recorder)
    try:
        with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as response:
            recorder.note(response.headers)
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm.tqdm(
                total=total, unit="B", unit_scale=True, desc=destination.name, leave=False
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp_name, destination)
    except (urllib.error.URLError, OSError, ValueError) as err:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise PretrainedWeightsError(
            f"Could not download {url} ({err}); download it on a machine with internet and put it "
            f"at {destination}."
        ) from err
    return recorder.sha256


def _digest_file(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _expected_sha256(path: pathlib.Path, weights: WeightsFile) -> str | None:
    """The pinned sha256 prefix, else the digest recorded beside the file at download."""
    if weights.sha256_prefix is not None:
        return weights.sha256_prefix
    recorded = _digest_file(path)
    if recorded.is_file():
        return _declared_sha256(recorded.read_text(encoding="ascii", errors="replace")) or "?"
    return None


def fetch_weights(
    name: str,
    weights: WeightsFile,
    cache_dir: str | os.PathLike | None = None,
    *,
    offline: bool | None = None,
) -> pathlib.Path:
    """Returns the local path of a verified weights file, downloading it when allowed.

    Args:
      name: backbone name (for messages).
      weights: the registry entry.
      cache_dir: msad_jax cache folder (see :func:`default_cache_dir`).
      offline: never touch the network; defaults to ``MSAD_JAX_OFFLINE``.

    Raises:
      PretrainedWeightsError: missing offline, download failure, or hash mismatch.
    """
    if weights.locate is not None:
        try:
            path = weights.locate()
        except FileNotFoundError as err:
            raise PretrainedWeightsError(str(err)) from None
        verify_sha256(path, weights.sha256_prefix)
        return path
    cache = default_cache_dir(cache_dir)
    target = cache / weights.filename
    for candidate in (target, _torch_hub_dir() / weights.filename):
        if candidate.is_file():
            verify_sha256(candidate, _expected_sha256(candidate, weights))
            return candidate
    offline = _offline_from_env() if offline is None else offline
    if offline or weights.url is None:
        source = f"download {weights.url}" if weights.url else f"obtain {weights.filename}"
        raise PretrainedWeightsError(
            f"Pretrained weights for {name} are not in the cache and msad_jax is offline: {source} "
            f"and put it at {target} (or point MSAD_JAX_CACHE at the folder that holds it)."
        )
    declared = download(weights.url, target)
    try:
        verify_sha256(target, weights.sha256_prefix or declared)
    except PretrainedWeightsError:
        target.unlink(missing_ok=True)
        raise
    if weights.sha256_prefix is None and declared is not None:
        _digest_file(target).write_text(declared + "\n", encoding="ascii")
    return target


def save_variables(variables: Mapping[str, Any], path: pathlib.Path) -> None:
    """Writes Flax variables as a flat ``.npz`` ('/'-joined keys), atomically."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_files.save_npz({k: np.asarray(v) for k, v in flat.items()}, path)


def load_variables(path: pathlib.Path) -> dict[str, Any]:
    """Reads variables written by :func:`save_variables` (no pickle)."""
    flat = weight_files.load_npz(path)
    return flax.traverse_util.unflatten_dict(flat, sep="/")
