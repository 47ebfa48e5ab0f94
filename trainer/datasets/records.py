"""The dataset as the trainer sees it, whatever its file format."""

from __future__ import annotations

import difflib
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
    orientation: the file's EXIF orientation (1: stored as displayed); width,
        height and boxes are in the displayed frame (trainer.datasets.images).
    """

    image_id: str
    path: Path
    width: int
    height: int
    xyxy: np.ndarray
    class_id: np.ndarray
    difficult: np.ndarray
    background: bool = False
    orientation: int = 1

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


class DatasetError(ValueError):
    """A dataset that cannot be trained or evaluated as it is; the message names the file to fix."""

    def __init__(self, problems: list[Problem], command: str):
        self.problems = tuple(problems)
        first = problems[0]
        more = f" (and {len(problems) - 1} more error(s))" if len(problems) > 1 else ""
        super().__init__(f"{first.file}: {first.message}{more}; `trainer check-dataset` lists them; {command}")


@dataclass(frozen=True)
class DatasetSplit:
    """The images of one split, and every problem found while reading them.

    num_listed: the images the split's file names (None: as many as records);
    the ones not in records were skipped, each with an error in problems.
    """

    dataset: str
    split: str
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...] = field(default=())
    num_listed: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        """Images the split names that could not be read (missing, unreadable, malformed annotation)."""
        return 0 if self.num_listed is None else self.num_listed - len(self.records)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

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


def did_you_mean(label: str, class_names: tuple[str, ...]) -> str:
    """"; did you mean 'X'?" for the class closest to a label (case ignored), or "" when none is close."""
    by_lower = {name.lower(): name for name in class_names}
    close = difflib.get_close_matches(label.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def unknown_label_problem(label: str, boxes: int, images: int, class_names: tuple[str, ...], source: Path) -> Problem:
    """The error for a label that is not one of the classes: its box and file counts, and the closest class.

    A typo in `classes` would otherwise drop every box of the class and train on nothing.
    """
    return Problem(
        source,
        f"label {label!r} is not one of the classes ({', '.join(class_names)}): {boxes} box(es) on {images} "
        f"image(s) dropped{did_you_mean(label, class_names)} (list a label not to train in dataset.ignore_labels)",
        "error",
    )


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
    image_id: str, path: Path, width: int, height: int, objects: list[tuple], source: Path, background: bool = False,
    orientation: int = 1,
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
        orientation=orientation,
    )
    return record, problems
