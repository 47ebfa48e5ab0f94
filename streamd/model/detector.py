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
from streamd.errors import BundleError
from streamd.model.bundle import Bundle, Preprocess, Thresholds
from streamd.model.detections import Detections
from streamd.model.postprocess import postprocess
from streamd.model.preprocess import letterbox_batch

YOLOX_STRIDES = (8, 16, 32)  # the head's output strides


def yolox_anchors(input_hw: tuple[int, int]) -> int:
    """The anchors (rows of the output) of a YOLOX head at input_hw: the sum over strides of (H/s) * (W/s)."""
    height, width = input_hw
    return sum((height // stride) * (width // stride) for stride in YOLOX_STRIDES)


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

    def submit(
        self, images_bgr: list[np.ndarray], prescales: list[float] | None = None,
        source_hw: list[tuple[int, int]] | None = None,
    ) -> Submitted:  # fmt: skip
        """Letterbox uint8 HxWx3 BGR images and start the backend on them, max_batch at a time.

        prescales / source_hw: for images that are already their source scaled down (by the decoder), the
        scale each was made with and the source's (H, W), so that boxes come back in source pixels.
        """
        tensor, scales = letterbox_batch(images_bgr, self.input_hw, self.preprocess)
        if prescales is not None:
            scales = scales * np.asarray(prescales, np.float32)
        sizes = source_hw or [(int(im.shape[0]), int(im.shape[1])) for im in images_bgr]
        step = self.backend.max_batch
        pending = tuple(self.backend.submit(tensor[start : start + step]) for start in range(0, len(tensor), step))
        return Submitted(scales, tuple(sizes), pending)

    def collect(self, submitted: Submitted, conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """Wait for a submitted batch and decode it: one Detections per image, boxes in source pixels."""
        outputs = [pending.wait() for pending in submitted.pending]
        output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return postprocess(output, submitted.scales, list(submitted.source_hw), conf_threshold, iou_threshold)

    def detect(self, images_bgr: list[np.ndarray], conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """submit + collect in one call (evaluation, prediction)."""
        return self.collect(self.submit(images_bgr), conf_threshold, iou_threshold)

    def warm_up(self, runs: int = 2) -> None:
        """Run the backend at batch 1 and at max_batch, so the first real frame is not slow (before READY=1).

        Raises BundleError when the model's output does not fit the bundle's class names or input size.
        """
        height, width = self.input_hw
        for size in sorted({1, self.backend.max_batch}):
            zeros = np.full((size, 3, height, width), self.preprocess.pad_value, np.float32)
            for _ in range(runs):
                self.check_output(self.backend.submit(zeros).wait(), size)

    def check_output(self, output: np.ndarray, batch: int) -> None:
        """The output of a batch must be [batch, A, 5 + classes], A the YOLOX anchors of input_hw."""
        anchors = yolox_anchors(self.input_hw)
        if output.ndim != 3 or output.shape[0] != batch:
            raise BundleError(f"model {self.name!r}: output of shape {output.shape} for a batch of {batch}")
        if output.shape[2] != 5 + len(self.class_names):
            raise BundleError(
                f"model {self.name!r}: the model scores {output.shape[2] - 5} classes but bundle.json class_names "
                f"names {len(self.class_names)} ({', '.join(self.class_names)})"
            )
        if output.shape[1] != anchors:
            raise BundleError(
                f"model {self.name!r}: the model has {output.shape[1]} anchors, but bundle.json input_hw "
                f"{list(self.input_hw)} gives {anchors} (strides {YOLOX_STRIDES})"
            )
