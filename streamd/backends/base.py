"""The one interface every inference backend implements: a FrameBatch in, a Pending out whose wait() gives its
detections.

    backend.submit(FrameBatch(pictures, conf, iou)) -> Pending[Decoded]

A Picture is an image as the decoder made it (BGR, or yuv420p planes for a backend whose `pixel_formats` takes
them), the scale it was made at and its source's size; the detections come back in source pixels. Where the rest
runs is the backend's own business:
- a host backend (HostBackend: ONNX Runtime, a function) letterboxes on the host, runs its model inside submit()
  and decodes + NMSes in wait(), so that the next batch's model overlaps this one's NMS when another thread waits;
- a device backend (torch, TensorRT) uploads the pictures as they are, and colour, letterbox, model, threshold
  and NMS run on its device; submit() returns at once and wait() blocks until the kept boxes are on the host.

`submit_tensor` runs the model alone on a letterboxed float32 [N, 3, H, W] batch (the bundle's contract check at
warm-up, the parity tests, the bare-model benchmark rows), with the same kind of Pending.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from streamd.errors import BackendError
from streamd.model.bundle import Preprocess
from streamd.model.postprocess import Decoded, decode_output
from streamd.model.preprocess import letterbox_batch
from streamd.types import BGR24, PixelFormat, PixelLayout, picture_hw

T = TypeVar("T", covariant=True)


@dataclass(frozen=True, slots=True)
class Picture:
    """One image for a backend.

    image: uint8, laid out as `layout` says (HxWx3 BGR, or yuv420p planes).
    prescale: the image is its source scaled by this (by the decoder; 1.0: the image is the source): boxes are
        divided by it. source_hw: the source's (H, W), which boxes are clipped to (None: the image's own).
    """

    image: np.ndarray
    layout: PixelLayout = BGR24
    prescale: float = 1.0
    source_hw: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.source_hw is None:
            object.__setattr__(self, "source_hw", picture_hw(self.image, self.layout.format))


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """Pictures to detect in, with the score and NMS IoU thresholds to detect at."""

    pictures: tuple[Picture, ...]
    conf_threshold: float
    iou_threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "pictures", tuple(self.pictures))

    @property
    def formats(self) -> frozenset[PixelFormat]:
        """The pixel formats of its pictures."""
        return frozenset(picture.layout.format for picture in self.pictures)

    @classmethod
    def of(cls, images: Sequence[np.ndarray], conf_threshold: float, iou_threshold: float) -> FrameBatch:
        """BGR images at their own size."""
        return cls(tuple(Picture(image) for image in images), conf_threshold, iou_threshold)

    def __len__(self) -> int:
        return len(self.pictures)

    def chunks(self, size: int) -> Iterator[FrameBatch]:
        """This batch in batches of at most `size` pictures, in order."""
        for start in range(0, len(self.pictures), size):
            yield FrameBatch(self.pictures[start : start + size], self.conf_threshold, self.iou_threshold)

    def source_hw(self) -> list[tuple[int, int]]:
        return [picture.source_hw for picture in self.pictures]

    def prescales(self) -> list[float]:
        return [picture.prescale for picture in self.pictures]

    def check(self, backend: Backend) -> None:
        """A BackendError unless the backend takes this many pictures in these pixel formats."""
        check_count(backend, len(self.pictures))
        formats = self.formats
        if not formats <= backend.pixel_formats:
            raise BackendError(f"backend {backend.name}: takes {sorted(backend.pixel_formats)} images only, "
                               f"got {sorted(formats)}")  # fmt: skip


def check_count(backend: Backend, count: int) -> None:
    """A BackendError unless 1 <= count <= the backend's max_batch (a FrameBatch's pictures, a tensor's rows)."""
    if not 1 <= count <= backend.max_batch:
        raise BackendError(f"backend {backend.name}: batch of {count} frames, it takes 1..{backend.max_batch}")


class Pending(Protocol[T]):
    """Work handed to a backend. wait() blocks until its result is on the host (raising the work's own error)."""

    def wait(self) -> T: ...


class Backend(Protocol):
    """Runs a bundle's model. pixel_formats: the picture formats submit() takes (every backend takes bgr24).
    precision: what it computes in ("fp32", "fp16", "bf16", "int8": the bar streamd.model.compare holds it to)."""

    name: str
    max_batch: int
    pixel_formats: frozenset[PixelFormat]
    precision: str

    def submit(self, batch: FrameBatch) -> Pending[Decoded]:
        """Start up to max_batch pictures; wait() gives one Detections per picture, in source pixels, and the rows
        dropped as invalid per picture."""
        ...

    def submit_tensor(self, tensor: np.ndarray) -> Pending[np.ndarray]:
        """Start the model alone on a letterboxed float32 [N, 3, H, W] batch (N <= max_batch); wait() gives its
        float32 [N, A, 5 + C] output (cx, cy, w, h in input pixels, objectness, class scores)."""
        ...

    def close(self) -> None: ...


class Ready(Generic[T]):
    """The Pending of a synchronous call: the result was computed inside submit()."""

    __slots__ = ("result",)

    def __init__(self, result: T):
        self.result = result

    def wait(self) -> T:
        return self.result


@dataclass(frozen=True, slots=True)
class HostPending:
    """A host backend's batch: the model's output, decoded + NMSed in wait() (by whoever waits)."""

    output: np.ndarray
    scales: np.ndarray
    batch: FrameBatch

    def wait(self) -> Decoded:
        batch = self.batch
        return decode_output(self.output, self.scales, batch.source_hw(), batch.conf_threshold, batch.iou_threshold)


class HostBackend(ABC):
    """A backend whose model runs synchronously on letterboxed float32 tensors on the host: submit() letterboxes
    the BGR pictures (model.preprocess, YOLOX's own) and runs `run`; its Pending decodes + NMSes in wait()."""

    name: str
    max_batch: int
    input_hw: tuple[int, int]
    preprocess: Preprocess
    pixel_formats: frozenset[PixelFormat] = frozenset({"bgr24"})
    precision: str = "fp32"  # ONNX Runtime runs the graph as it is, in float32 (Q/DQ nodes included)

    @abstractmethod
    def run(self, tensor: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> float32 [N, A, 5 + C], in the call."""

    def submit(self, batch: FrameBatch) -> HostPending:
        batch.check(self)
        tensor, scales = letterbox_batch([p.image for p in batch.pictures], self.input_hw, self.preprocess)
        scales = scales * np.asarray(batch.prescales(), np.float32)
        return HostPending(self.run(tensor), scales, batch)

    def submit_tensor(self, tensor: np.ndarray) -> Ready[np.ndarray]:
        check_count(self, len(tensor))
        return Ready(self.run(tensor))

    def close(self) -> None:
        pass


class FunctionBackend(HostBackend):
    """A host backend around a function float32 [N, 3, H, W] -> float32 [N, A, 5 + C] (the trainer's torch model)."""

    def __init__(
        self, run: Callable[[np.ndarray], np.ndarray], input_hw: tuple[int, int], preprocess: Preprocess = Preprocess(),
        max_batch: int = 8, name: str = "function",
    ):  # fmt: skip
        self._run = run
        self.input_hw = tuple(input_hw)
        self.preprocess = preprocess
        self.max_batch = max_batch
        self.name = name

    def run(self, tensor: np.ndarray) -> np.ndarray:
        return self._run(tensor)
