"""The one path from pictures to Detections, in chunks of the backend's max_batch.

Every backend takes a FrameBatch and gives a Pending whose wait() is the batch's Decoded (streamd.backends.base):
where the letterbox, the model and the NMS run (the host for ONNX Runtime, a device for torch and TensorRT) is the
backend's business, and the pixel formats it takes (`pixel_formats`) its only difference that callers see: the
decoder hands yuv420p planes only to a backend that takes them.

Used by the daemon's inference stages, `trainer eval` and `trainer predict`,
so what the trainer measures is what streamd runs. It joins the model's contract (streamd.model, NumPy only) to a
backend (streamd.backends), so it lives above both: model/ imports no backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamd.backends.base import Backend, FrameBatch, Pending, Picture
from streamd.errors import BundleError
from streamd.model.bundle import Bundle, Preprocess, Thresholds
from streamd.model.detections import Detections
from streamd.model.postprocess import YOLOX_STRIDES, Decoded, yolox_anchors
from streamd.types import PixelFormat, PixelLayout


@dataclass(frozen=True, slots=True)
class Joined:
    """A FrameBatch larger than the backend's max_batch, submitted in parts: one Decoded for all of it, in order."""

    parts: tuple[Pending[Decoded], ...]

    def wait(self) -> Decoded:
        decoded = [part.wait() for part in self.parts]
        return Decoded([found for part in decoded for found in part.detections],
                       tuple(count for part in decoded for count in part.invalid_boxes))  # fmt: skip


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

    @property
    def pixel_formats(self) -> frozenset[PixelFormat]:
        """The picture formats the backend takes ("bgr24" always; "yuv420p" planes for a device backend)."""
        return self.backend.pixel_formats

    @classmethod
    def for_bundle(cls, bundle: Bundle, backend: Backend) -> Detector:
        meta = bundle.meta
        return cls(backend, tuple(meta.input_hw), meta.class_names, meta.preprocess, meta.name, bundle.sha256,
                   meta.thresholds.conf_threshold, meta.thresholds.iou_threshold)

    def batch(
        self, pictures: Sequence[Picture], conf_threshold: float | None = None, iou_threshold: float | None = None
    ) -> FrameBatch:
        """A FrameBatch of pictures at these thresholds (None: the detector's, from the bundle)."""
        conf = self.conf_threshold if conf_threshold is None else conf_threshold
        iou = self.iou_threshold if iou_threshold is None else iou_threshold
        return FrameBatch(tuple(pictures), conf, iou)

    def submit(self, batch: FrameBatch) -> Pending[Decoded]:
        """Start the backend on a batch of any size, max_batch at a time; wait() gives one Detections per picture
        (boxes in source pixels) and the invalid rows dropped per picture."""
        parts = tuple(self.backend.submit(part) for part in batch.chunks(self.backend.max_batch))
        return parts[0] if len(parts) == 1 else Joined(parts)  # no parts: no pictures, an empty Decoded

    def detect(
        self, images_bgr: Sequence[np.ndarray], conf_threshold: float | None = None, iou_threshold: float | None = None
    ) -> list[Detections]:
        """BGR images at their own size, submitted and waited for (evaluation, prediction)."""
        batch = self.batch([Picture(image) for image in images_bgr], conf_threshold, iou_threshold)
        return self.submit(batch).wait().detections

    def warm_up(self, runs: int = 2) -> None:
        """Run the backend before READY=1, so that the first real frames are not slow.

        The model alone (submit_tensor) at batch 1 and max_batch, checking the output's shape; then pictures in
        every pixel format the backend takes, `runs` times (so that a device backend's every slot has been used),
        at batch 1 and max_batch, and at every batch size in between for a backend that takes the decoder's
        planes (a device: without CUDA graphs, cuDNN autotunes each new batch size on its first use).
        Raises BundleError when the model's output does not fit the bundle's class names or input size.
        """
        height, width = self.input_hw
        max_batch = self.backend.max_batch
        for size in sorted({1, max_batch}):
            zeros = np.full((size, 3, height, width), self.preprocess.pad_value, np.float32)
            self.check_output(self.backend.submit_tensor(zeros).wait(), size)
        pictures = [Picture(np.full((height, width, 3), self.preprocess.pad_value, np.uint8))]
        if "yuv420p" in self.pixel_formats:  # input_hw: multiples of 32
            pictures.append(Picture(np.full((height * 3 // 2, width), 128, np.uint8), PixelLayout("yuv420p")))
        sizes = range(1, max_batch + 1) if len(pictures) > 1 else sorted({1, max_batch})
        for size in sizes:
            for picture in pictures:
                for _ in range(runs):
                    self.submit(self.batch([picture] * size)).wait()

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
