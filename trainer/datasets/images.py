"""Images as the trainer reads them: one policy for EXIF orientation, everywhere an image is read.

A camera may store a photo sideways with an EXIF orientation tag saying how
to turn it for display. Labelling tools (LabelImg, CVAT, Label Studio) show
the image turned, so the boxes they write are in the displayed frame. The
trainer does the same everywhere (datasets and check-dataset: `image_info`;
training, eval and predict: `read_image`): an image's width, height and
pixels are those of the displayed image. Both take the tag from PIL and turn
the pixels themselves, so that a size and the pixels never disagree, whatever
the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 stored as displayed; 2-8 mirrored and/or turned
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image file's displayed size in pixels and its EXIF orientation (1 when it has none or an invalid one)."""

    width: int
    height: int
    orientation: int = 1

    @property
    def rotated(self) -> bool:
        """Stored otherwise than displayed: its pixels are turned (or mirrored) when read."""
        return self.orientation != 1


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_info(path: Path) -> ImageInfo:
    """The displayed size and orientation of an image that decodes in full.

    Raises OSError for an unreadable, truncated or corrupt file: reading the
    header (or PIL's verify()) is not enough, since a truncated JPEG passes
    both and OpenCV later decodes it with its missing half grey.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _orientation(image)
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG at 1/8 scale: every byte read, less work
            image.load()
    except _READ_ERRORS as exc:
        raise OSError(f"unreadable image: {exc}") from exc
    if orientation >= 5:  # turned a quarter: the displayed image is the stored one on its side
        width, height = height, width
    return ImageInfo(width, height, orientation)


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """image (H x W x C, as stored) turned and mirrored as EXIF `orientation` says, as PIL's exif_transpose does."""
    match orientation:
        case 2:
            return image[:, ::-1]
        case 3:
            return image[::-1, ::-1]
        case 4:
            return image[::-1]
        case 5:
            return image.transpose(1, 0, 2)
        case 6:
            return np.rot90(image, -1)  # a quarter turn clockwise
        case 7:
            return image[::-1, ::-1].transpose(1, 0, 2)
        case 8:
            return np.rot90(image, 1)
    return image


def read_image(path: Path, expected_wh: tuple[int, int] | None = None) -> np.ndarray:
    """The displayed image as BGR uint8 [H, W, 3], contiguous; raises OSError naming the file when it cannot be read,
    or when its displayed size differs from `expected_wh` (width, height) as the dataset measured it."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise OSError(f"{path}: cannot be read as an image")
    try:
        with Image.open(path) as header:
            orientation = _orientation(header)
    except _READ_ERRORS as exc:
        raise OSError(f"{path}: unreadable image: {exc}") from exc
    image = np.ascontiguousarray(orient(image, orientation))
    if expected_wh is not None and (image.shape[1], image.shape[0]) != tuple(expected_wh):
        raise OSError(
            f"{path}: decoded as {image.shape[1]}x{image.shape[0]}, not the {expected_wh[0]}x{expected_wh[1]} "
            "it was read as (changed on disk?)"
        )
    return image
