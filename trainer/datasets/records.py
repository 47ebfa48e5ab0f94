"""The dataset as the trainer sees it, whatever its file format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image of a split and its boxes.

    xyxy: float32 [N, 4] in image pixels, already clipped to the image.
    class_id: int64 [N], index into the experiment's class names.
    difficult: bool [N], VOC's difficult flag (ignored by VOC mAP, as in VOC).
    background: the image has no annotation at all (no XML / no COCO annotation);
        it trains as a negative and counts in evaluation.
    """

    image_id: str
    path: Path
    width: int
    height: int
    xyxy: np.ndarray
    class_id: np.ndarray
    difficult: np.ndarray
    background: bool = False

    def __post_init__(self) -> None:
        for name, dtype, shape in (("xyxy", np.float32, (-1, 4)), ("class_id", np.int64, (-1,)), ("difficult", bool, (-1,))):
            array = np.asarray(getattr(self, name), dtype=dtype).reshape(shape)
            array.setflags(write=False)
            object.__setattr__(self, name, array)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in the dataset, with the file it is in."""

    file: Path
    message: str
    severity: Literal["error", "warning"] = "warning"

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.message}"


@dataclass(frozen=True)
class DatasetSplit:
    """The images of one split, and every problem found while reading them."""

    dataset: str
    split: str
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_background(self) -> int:
        return sum(r.background for r in self.records)

    def file_list_hash(self) -> str:
        """sha256 of the sorted image file names and the class names: the dataset's identity."""
        digest = hashlib.sha256()
        for name in sorted(r.path.name for r in self.records):
            digest.update(name.encode() + b"\n")
        digest.update("|".join(self.class_names).encode())
        return digest.hexdigest()


def leaves_root(name: str) -> bool:
    """Whether a file name from a dataset (a split id, a COCO file_name) points outside its folder: absolute or with '..'."""
    path = Path(name)
    return path.is_absolute() or ".." in path.parts


def clip_boxes(
    xyxy: np.ndarray, width: int, height: int, source: Path, labels: list[str]
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Clip boxes to the image; return (clipped, keep mask, problems) dropping zero-area boxes."""
    problems = []
    clipped = xyxy.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for i in range(len(xyxy)):
        box = [round(float(v), 1) for v in xyxy[i]]
        if not keep[i]:
            problems.append(Problem(source, f"zero-area box {box} ({labels[i]}) dropped"))
        elif not np.allclose(clipped[i], xyxy[i]):
            problems.append(Problem(source, f"box {box} ({labels[i]}) outside the {width}x{height} image, clipped"))
    return clipped, keep, problems


def record_from_objects(
    image_id: str, path: Path, width: int, height: int, objects: list[tuple], source: Path, background: bool = False
) -> tuple[ImageRecord, list[Problem]]:
    """An ImageRecord from parsed objects [(label, class index, xyxy, difficult)], boxes clipped or dropped.

    source is the annotation file the problems name.
    """
    xyxy = np.asarray([o[2] for o in objects], dtype=np.float32).reshape(-1, 4)
    clipped, keep, problems = clip_boxes(xyxy, width, height, source, [o[0] for o in objects])
    record = ImageRecord(
        image_id,
        path,
        width,
        height,
        clipped[keep],
        np.asarray([o[1] for o in objects], dtype=np.int64).reshape(-1)[keep],
        np.asarray([o[3] for o in objects], dtype=bool).reshape(-1)[keep],
        background=background,
    )
    return record, problems
