"""How a backbone wants its input images: the description both backbones and transforms use."""

from __future__ import annotations

import dataclasses

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
METHODS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input images.

    Attributes:
      resize: shorter side after resizing when ``crop`` is set; both sides (square) when ``crop`` is
        None.
      crop: side of the center crop, or None for no crop.
      method: 'bilinear' or 'bicubic' (Pillow semantics, antialiased when shrinking).
      mean: per-channel mean in [0, 1] units, subtracted after scaling to [0, 1].
      std: per-channel standard deviation in [0, 1] units.
    """

    resize: int
    crop: int | None
    method: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Preprocessing.method={self.method!r}: use one of {METHODS}.")
        if self.resize < 1:
            raise ValueError(f"Preprocessing.resize={self.resize} must be a positive integer.")
        if self.crop is not None and not 1 <= self.crop <= self.resize:
            raise ValueError(
                f"Preprocessing.crop={self.crop} must lie in [1, resize={self.resize}] or be None."
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("Preprocessing.mean/std must be 3 numbers each, std > 0.")

    @property
    def size(self) -> int:
        """Side of the (square) output image."""
        return self.crop if self.crop is not None else self.resize
