"""The one path from BGR images to Detections: letterbox -> backend (in chunks of max_batch) -> decode + NMS.

Used by the daemon's inference stages, `trainer eval` and `trainer predict`,
so what the trainer measures is what streamd runs. NumPy only: the backend
is anything with `submit(batch) -> Pending` and `max_batch`
(streamd.backends.base.Backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.backends.base import Backend, Pending
from streamd.model.bundle import Bundle, Preprocess, Thresholds
from streamd.model.detections import Detections
from streamd.model.postprocess import postprocess
from streamd.model.preprocess import letterbox_batch


@dataclass(frozen=True, slots=True)
class Submitted:
    """Images handed to the backend: their letterbox scales, source sizes (H, W) and one Pending per chunk."""

    scales: np.ndarray
    source_hw: tuple[tuple[int, int], ...]
    pending: tuple[Pending, ...]


@dataclass(frozen=True)
class Detector:
    """A model's detector: input_hw and preprocess from its bundle, class names in label order.

    name / sha256 identify the model in every message and log line ("" for a
    checkpoint that is not a bundle yet). conf_threshold / iou_threshold: the
    bundle's defaults, for callers that set none.
    """

    backend: Backend
    input_hw: tuple[int, int]
    class_names: tuple[str, ...]
    preprocess: Preprocess = Preprocess()
    name: str = "model"
    sha256: str = ""
    conf_threshold: float = Thresholds().conf_threshold
    iou_threshold: float = Thresholds().iou_threshold

    @classmethod
    def for_bundle(cls, bundle: Bundle, backend: Backend) -> Detector:
        meta = bundle.meta
        return cls(backend, tuple(meta.input_hw), meta.class_names, meta.preprocess, meta.name, bundle.sha256,
                   meta.thresholds.conf_threshold, meta.thresholds.iou_threshold)

    def submit(self, images_bgr: list[np.ndarray]) -> Submitted:
        """Letterbox uint8 HxWx3 BGR images and start the backend on them, max_batch at a time."""
        tensor, scales = letterbox_batch(images_bgr, self.input_hw, self.preprocess)
        step = self.backend.max_batch
        pending = tuple(self.backend.submit(tensor[start : start + step]) for start in range(0, len(tensor), step))
        return Submitted(scales, tuple((int(im.shape[0]), int(im.shape[1])) for im in images_bgr), pending)

    def collect(self, submitted: Submitted, conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """Wait for a submitted batch and decode it: one Detections per image, boxes in source pixels."""
        outputs = [pending.wait() for pending in submitted.pending]
        output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return postprocess(output, submitted.scales, list(submitted.source_hw), conf_threshold, iou_threshold)

    def detect(self, images_bgr: list[np.ndarray], conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """submit + collect in one call (evaluation, prediction)."""
        return self.collect(self.submit(images_bgr), conf_threshold, iou_threshold)

    def warm_up(self, runs: int = 2) -> None:
        """Run the backend at batch 1 and at max_batch, so the first real frame is not slow (before READY=1)."""
        height, width = self.input_hw
        for size in sorted({1, self.backend.max_batch}):
            zeros = np.full((size, 3, height, width), self.preprocess.pad_value, np.float32)
            for _ in range(runs):
                self.backend.submit(zeros).wait()
