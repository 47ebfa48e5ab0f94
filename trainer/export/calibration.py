"""Calibration images for int8: a dataset split letterboxed exactly as streamd feeds frames.

One reader, two consumers: ONNX Runtime static quantization (`trainer
quantize`, trainer.export.quantize) and TensorRT's int8 calibrator (`trainer
build-engine --precision int8`, trainer.export.engine). Both see the first
`max_images` readable images of the experiment's **train** split (never the
test split that AP is reported on), through the bundle's own letterbox and
preprocess (streamd.model.preprocess.letterbox_batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from streamd.model.bundle import Bundle, Preprocess
from streamd.model.preprocess import letterbox
from trainer.config import Experiment

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = "train"


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """The images to calibrate on and the letterbox that feeds them to the model.

    paths: image files in split order, at most the requested count.
    input_hw, preprocess: the bundle's (bundle.json `input_hw`, `preprocess`).
    """

    dataset: str
    split: str
    dataset_hash: str  # DatasetSplit.file_list_hash() of the whole split
    paths: tuple[Path, ...]
    input_hw: tuple[int, int]
    preprocess: Preprocess

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[np.ndarray]:
        """float32 [B, 3, H, W] letterboxed batches, in split order.

        An unreadable image is skipped with a warning naming it, and the batch
        is filled from the next images; an image that reads but cannot be
        letterboxed raises ValueError naming it. drop_last drops a last partial
        batch (TensorRT's calibrator needs every batch at its declared size).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        tensors: list[np.ndarray] = []
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                log.warning("%s: cannot be read as an image; left out of calibration", path)
                continue
            try:
                tensors.append(letterbox(image, self.input_hw, self.preprocess).tensor)
            except (cv2.error, ValueError) as exc:
                raise ValueError(f"{path}: cannot be letterboxed for calibration: {exc}") from exc
            if len(tensors) == batch_size:
                yield np.stack(tensors)
                tensors = []
        if tensors and not drop_last:
            yield np.stack(tensors)

    def fingerprint(self) -> str:
        """sha256 of what the calibration sees: each image's name and contents, their count, input_hw, preprocess.

        New or changed images, another count or another letterbox give another
        fingerprint (and so another TensorRT calibration cache); moving the
        dataset folder does not. An image that cannot be read is hashed as missing.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps([len(self.paths), list(self.input_hw), self.preprocess.model_dump(mode="json")]).encode())
        for path in self.paths:
            try:
                contents = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                contents = "missing"
            digest.update(f"\n{path.name}:{contents}".encode())
        return digest.hexdigest()


def calibration_set(exp: Experiment, bundle: Bundle, max_images: int, experiment_file: Path | None = None) -> CalibrationSet:
    """The first `max_images` images of exp's train split, to be letterboxed as `bundle` expects.

    Raises ValueError, naming the experiment file when given, when exp's
    classes differ from the bundle's (the calibration would describe another
    model's data) or when the split has no image.
    """
    from trainer.datasets import load_split

    where = f"{experiment_file}: " if experiment_file is not None else ""
    if tuple(exp.classes) != tuple(bundle.class_names):
        raise ValueError(
            f"{where}classes {list(exp.classes)} differ from those of bundle {bundle.path} {list(bundle.class_names)}"
        )
    if max_images < 1:
        raise ValueError(f"the calibration needs at least 1 image, got {max_images}")
    split = load_split(exp, CALIBRATION_SPLIT)
    if len(split) == 0:
        raise ValueError(f"{where}the {CALIBRATION_SPLIT} split of dataset {exp.dataset.name} has no image to calibrate on")
    return CalibrationSet(
        dataset=exp.dataset.name,
        split=CALIBRATION_SPLIT,
        dataset_hash=split.file_list_hash(),
        paths=tuple(r.path for r in split.records[:max_images]),
        input_hw=tuple(bundle.meta.input_hw),
        preprocess=bundle.meta.preprocess,
    )


__all__ = ["CALIBRATION_SPLIT", "CalibrationSet", "calibration_set"]
