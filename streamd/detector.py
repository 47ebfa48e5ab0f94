"""The one path from images to Detections, in chunks of the backend's max_batch.

Two ways, chosen by what the backend is (streamd.backends.base):
- a Backend (ONNX Runtime, or any `submit(batch) -> Pending`): letterbox on the host, the backend,
  then decode + NMS on the host (NumPy);
- a FrameBackend (torch, TensorRT): the frames go to the backend as decoded (BGR or yuv420p planes)
  and colour, letterbox, model, threshold and NMS run on its device; only detections come back.

Used by the daemon's inference stages, `trainer eval` and `trainer predict`,
so what the trainer measures is what streamd runs. It joins the model's contract (streamd.model, NumPy only) to a
backend (streamd.backends), so it lives above both: model/ imports no backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from streamd.backends.base import Backend, FrameBackend, Pending, PendingDetections
from streamd.errors import BundleError
from streamd.model.bundle import Bundle, Preprocess, Thresholds
from streamd.model.detections import Detections
from streamd.model.postprocess import YOLOX_STRIDES, Decoded, decode_output, yolox_anchors
from streamd.model.preprocess import letterbox_batch
from streamd.types import BGR24, PixelLayout, picture_hw

class Submitted(Protocol):
    """Images handed to the backend. decoded() blocks until they are done: one Detections per image, and the rows
    dropped as invalid per image (non-finite, or no area)."""

    def decoded(self) -> Decoded: ...


@dataclass(frozen=True, slots=True)
class HostSubmitted:
    """Letterboxed on the host: the scales, source sizes (H, W), thresholds and one Pending per chunk."""

    scales: np.ndarray
    source_hw: tuple[tuple[int, int], ...]
    pending: tuple[Pending, ...]
    conf_threshold: float
    iou_threshold: float

    def decoded(self) -> Decoded:
        outputs = [pending.wait() for pending in self.pending]
        output = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return decode_output(output, self.scales, list(self.source_hw), self.conf_threshold, self.iou_threshold)


@dataclass(frozen=True, slots=True)
class DeviceSubmitted:
    """Handed to a FrameBackend as decoded: one PendingDetections per chunk. The device drops the invalid rows the
    host does (streamd.backends.device_ops) without counting them: invalid_boxes are 0 here."""

    pending: tuple[PendingDetections, ...]

    def decoded(self) -> Decoded:
        found = [detections for pending in self.pending for detections in pending.wait()]
        return Decoded(found, (0,) * len(found))


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

    @cached_property
    def on_device(self) -> bool:
        """Whether the backend takes frames as decoded (a FrameBackend): asked once, not on every batch."""
        return isinstance(self.backend, FrameBackend)

    @classmethod
    def for_bundle(cls, bundle: Bundle, backend: Backend) -> Detector:
        meta = bundle.meta
        return cls(backend, tuple(meta.input_hw), meta.class_names, meta.preprocess, meta.name, bundle.sha256,
                   meta.thresholds.conf_threshold, meta.thresholds.iou_threshold)

    def submit(
        self,
        images: Sequence[np.ndarray],
        prescales: Sequence[float] | None = None,
        source_hw: Sequence[tuple[int, int]] | None = None,
        *,
        layouts: Sequence[PixelLayout] | None = None,
        conf_threshold: float | None = None,
        iou_threshold: float | None = None,
    ) -> Submitted:
        """Start the backend on uint8 images, max_batch at a time; collect() gives their detections.

        images: HxWx3 BGR, or (a layout's format "yuv420p", for a FrameBackend only) PyAV's yuv420p planes.
        prescales / source_hw: for images that are already their source scaled down (by the decoder), the
        scale each was made with and the source's (H, W), so that boxes come back in source pixels.
        conf_threshold / iou_threshold: None takes the detector's (the bundle's).
        """
        conf = self.conf_threshold if conf_threshold is None else conf_threshold
        iou = self.iou_threshold if iou_threshold is None else iou_threshold
        layouts = list(layouts or [BGR24] * len(images))
        prescales = list(prescales or [1.0] * len(images))
        sizes = list(source_hw or [picture_hw(image, layout.format) for image, layout in zip(images, layouts)])
        step = self.backend.max_batch
        if self.on_device:
            chunks = range(0, len(images), step)
            return DeviceSubmitted(tuple(
                self.backend.submit_frames(images[i : i + step], layouts[i : i + step], prescales[i : i + step],
                                           sizes[i : i + step], conf, iou)
                for i in chunks
            ))  # fmt: skip
        if any(layout.format != "bgr24" for layout in layouts):
            raise ValueError(f"backend {self.backend.name}: takes BGR images only, got {sorted({l.format for l in layouts})}")
        tensor, scales = letterbox_batch(list(images), self.input_hw, self.preprocess)
        scales = scales * np.asarray(prescales, np.float32)
        pending = tuple(self.backend.submit(tensor[start : start + step]) for start in range(0, len(tensor), step))
        return HostSubmitted(scales, tuple(sizes), pending, conf, iou)

    @staticmethod
    def collect(submitted: Submitted) -> list[Detections]:
        """Wait for submitted images: one Detections per image, boxes in source pixels."""
        return submitted.decoded().detections

    def detect(self, images_bgr: list[np.ndarray], conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """submit + collect in one call (evaluation, prediction)."""
        return self.collect(self.submit(images_bgr, conf_threshold=conf_threshold, iou_threshold=iou_threshold))

    def warm_up(self, runs: int = 2) -> None:
        """Run the backend before READY=1, so that the first real frames are not slow.

        submit() at batch 1 and max_batch, checking the output's shape. A FrameBackend also takes frames at every
        batch size (without CUDA graphs, cuDNN autotunes each new batch size on its first use) as BGR and as
        yuv420p planes (the colour-conversion kernels), `runs` times so that every slot has been used.
        Raises BundleError when the model's output does not fit the bundle's class names or input size.
        """
        height, width = self.input_hw
        for size in sorted({1, self.backend.max_batch}):
            zeros = np.full((size, 3, height, width), self.preprocess.pad_value, np.float32)
            for _ in range(runs):
                self.check_output(self.backend.submit(zeros).wait(), size)
        if self.on_device:
            bgr = np.full((height, width, 3), self.preprocess.pad_value, np.uint8)
            planes = np.full((height * 3 // 2, width), 128, np.uint8)  # input_hw: multiples of 32
            for size in range(1, self.backend.max_batch + 1):
                for image, layout in ((bgr, BGR24), (planes, PixelLayout("yuv420p"))):
                    for _ in range(runs):
                        self.collect(self.submit([image] * size, layouts=[layout] * size))

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
