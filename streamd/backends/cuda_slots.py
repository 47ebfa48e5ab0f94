"""Batches in flight on one CUDA device, shared by the torch and TensorRT backends: buffers, streams, events, order.

Each of SLOTS slots holds one batch: a pinned host input and a device staging input (float [max_batch, 3, H, W]),
a device output and a pinned host output ([max_batch, A, 5 + C]), and pinned and device uint8 buffers for frames,
grown to the largest batch of frames seen. A batch on slot s runs as

    upload stream:   host -> device (the letterboxed batch, or the frames as decoded, then letterbox_frames
                     into the staging input), record uploaded[s]
    compute stream:  wait uploaded[s]; the model or engine (`run`) -> output[s]; for a letterboxed batch
                     output[s] -> host output[s]; record done[s]
    wait():          block on done[s] (a blocking event: the thread sleeps instead of spinning a core the
                     decoders need), then copy the host output, or threshold + NMS on output[s] on the device
                     (postprocess_on_device) so that only the kept boxes come to the host

so the upload and letterbox of batch k+1 overlap the model on batch k. A slot is reused only after its previous
batch was collected, finish() included (take waits for it, in whichever thread collects it). Every entry point (submit, wait, close) runs under the backend's device
in the calling thread: CUDA's current device is per thread, and the daemon builds the backend in one thread,
submits from its inference thread and waits from its results thread. One thread submits at a time.

The CUDA calls go through a small runtime, CudaRuntime (torch.cuda on one device); the tests run the same slot
code under a recording runtime on the CPU that checks this order (tests/streamd/backends/fake_gpu.py), and under
a simulated one whose streams run later in threads of their own, with a happens-before checker (sim_cuda.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from streamd.backends.base import FrameBatch
from streamd.backends.device_ops import letterbox_frames, postprocess_on_device
from streamd.errors import BackendError
from streamd.model.bundle import Preprocess
from streamd.model.postprocess import Decoded

log = logging.getLogger(__name__)

SLOTS = 2  # batches in flight: one uploading while the other computes

# run(images, output): the model or engine on the compute stream, on images (a [n, 3, H, W] view of the staging
# input); it writes `output` (a [n, A, 5 + C] view of the slot's device output) or returns a tensor that the slot
# copies there (the torch model's own output, or a CUDA graph's static output, which both slots share).
Run = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class CudaRuntime:
    """torch.cuda on one device: the calls CudaSlots makes. `what` and `slot` arguments only name the call."""

    def __init__(self, device: torch.device, label: str):
        if not torch.cuda.is_available():
            raise BackendError(f"{label}: device {device}, but no CUDA GPU is available (torch.cuda.is_available() is False)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise BackendError(f"{label}: device {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        self.device = device
        try:
            self.gpu_name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError) as exc:
            raise BackendError(f"{label}: CUDA device {device} is not usable: {exc}") from exc

    def guard(self) -> contextlib.AbstractContextManager:
        return torch.cuda.device(self.device)

    def stream(self, name: str) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self, kind: str, slot: int) -> torch.cuda.Event:
        return torch.cuda.Event(blocking=True)  # synchronize() sleeps; a non-blocking event spins a core

    def on(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def handle(self, stream: torch.cuda.Stream) -> int:
        return stream.cuda_stream

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, what: str, slot: int) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def wait(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def synchronize(self, stream: torch.cuda.Stream) -> None:
        stream.synchronize()

    def capture(self, runs: dict[int, Callable[[], None]]) -> dict[int, Callable[[], None]]:
        """One CUDA graph per key of `runs` (each reads and writes static buffers), sharing one memory pool; their replays.

        Each run goes 3 times on a side stream first: cuDNN's autotuning and lazy initialisation must not happen
        inside a capture. Largest key first, so that the smaller graphs reuse its pool blocks (they only ever
        replay one after another, on one stream).
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for run in runs.values():
                for _ in range(3):
                    run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        replays, pool = {}, torch.cuda.graph_pool_handle()
        for key in sorted(runs, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                runs[key]()
            replays[key] = graph.replay
        torch.cuda.synchronize(self.device)
        return replays


def source_scales(letterbox_scales: Sequence[float], prescales: Sequence[float]) -> list[float]:
    """Source pixels -> model input pixels: the letterbox scale of the image times the image's own prescale."""
    return [scale * prescale for scale, prescale in zip(letterbox_scales, prescales)]


class SlotPending:
    """One batch in a slot. wait() blocks on the slot's done event, then finishes the batch (thread-safe: the results
    thread waits while the submit thread, reusing the slot, collects it in take())."""

    __slots__ = ("_slots", "_slot", "_what", "_finish", "_result", "_error", "_lock")

    def __init__(self, slots: CudaSlots, slot: int, what: str, finish: Callable[[], object]):
        self._slots, self._slot, self._what, self._finish = slots, slot, what, finish
        self._result = None
        self._error: BackendError | None = None  # a failed batch fails its own wait(), not the next submit's
        self._lock = threading.Lock()  # the results thread and a submit reusing the slot may both wait

    def wait(self):
        """The batch's result (a host copy that outlives the slot's reuse); CUDA errors of the batch raise here."""
        self.collect()
        if self._error is not None:
            raise self._error
        return self._result

    def collect(self) -> None:
        """Block on the slot's done event and finish the batch, once; only then is the slot free for the next batch
        (its pinned input, staging input and output are this batch's until finish() has read them). A failure is
        kept for wait(): the next submit on the slot (take) collects without raising it."""
        with self._lock:
            if self._finish is None:
                return
            slots, finish = self._slots, self._finish
            self._finish = None  # finished, or failed: a second wait() is not a rerun
            try:
                with slots.entry(self._what):
                    slots.runtime.wait(slots.done[self._slot])
                    self._result = finish()
            except BackendError as exc:
                self._error = exc
            finally:
                if slots.in_flight[self._slot] is self:
                    slots.in_flight[self._slot] = None


class CudaSlots:
    """SLOTS batches in flight on one device, for batches of 1..max_batch: the buffers, streams, events and order."""

    def __init__(self, runtime, label: str, max_batch: int, input_chw: tuple[int, int, int], input_dtype: torch.dtype,
                 output_rows: tuple[int, int], output_dtype: torch.dtype):  # fmt: skip
        self.runtime, self.label, self.max_batch = runtime, label, max_batch
        input_shape, output_shape = (max_batch, *input_chw), (max_batch, *output_rows)
        rt = runtime
        try:
            with rt.guard():
                self.upload_stream, self.compute_stream = rt.stream("upload"), rt.stream("compute")
                self.host_in = [rt.pinned(input_shape, input_dtype) for _ in range(SLOTS)]
                self.staged = [rt.empty(input_shape, input_dtype) for _ in range(SLOTS)]
                self.output = [rt.empty(output_shape, output_dtype) for _ in range(SLOTS)]
                self.host_out = [rt.pinned(output_shape, output_dtype) for _ in range(SLOTS)]
                self.host_frames = [rt.pinned((0,), torch.uint8) for _ in range(SLOTS)]
                self.dev_frames = [rt.empty((0,), torch.uint8) for _ in range(SLOTS)]
                self.uploaded = [rt.event("uploaded", slot) for slot in range(SLOTS)]
                self.done = [rt.event("done", slot) for slot in range(SLOTS)]
        except RuntimeError as exc:  # out of memory, a bad device
            raise BackendError(f"{label}: cannot allocate buffers on {rt.device} for batches of {max_batch}: {exc}") from exc
        self.in_flight: list[SlotPending | None] = [None] * SLOTS
        self._next_slot = 0

    @contextlib.contextmanager
    def entry(self, what: str) -> Iterator[None]:
        """Under the device in the calling thread, without autograd; a CUDA error becomes a BackendError naming both."""
        try:
            with self.runtime.guard(), torch.inference_mode():
                yield
        except RuntimeError as exc:  # CUDA errors surface as RuntimeError, at the call or at a later sync
            raise BackendError(f"{self.label}: CUDA error on {self.runtime.device} on {what}: {exc}") from exc

    def take(self) -> int:
        """The next slot, once the batch it still holds (if any) is collected: its buffers are that batch's."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % SLOTS
        previous = self.in_flight[slot]
        if previous is not None:
            previous.collect()  # its error, if any, is its own wait()'s
        return slot

    def submit_tensor(self, tensor: np.ndarray, run: Run) -> SlotPending:
        """A letterboxed float32 [N, 3, H, W] host batch; wait() gives float32 [N, A, 5 + C] on the host."""
        count, what = int(tensor.shape[0]), f"a batch of {tensor.shape[0]}"
        with self.entry(what):
            slot = self.take()
            host = self.host_in[slot][:count]
            host.copy_(torch.from_numpy(tensor))
            self.runtime.copy(self.staged[slot][:count], host, self.upload_stream, "h2d", slot)
            self.runtime.record(self.uploaded[slot], self.upload_stream)
            self._compute(slot, count, run, to_host=True)
        return self._pending(slot, what, lambda: self.host_out[slot][:count].numpy().astype(np.float32, copy=True))

    def submit(self, batch: FrameBatch, input_hw: tuple[int, int], preprocess: Preprocess, run: Run) -> SlotPending:
        """Pictures as decoded (base.Backend.submit); wait() gives one Detections per picture, in source pixels (the
        device drops the rows the host counts as invalid without counting them: invalid_boxes are 0)."""
        count, what = len(batch), f"a batch of {len(batch)} frames"
        images = [picture.image for picture in batch.pictures]
        with self.entry(what):
            slot = self.take()
            with self.runtime.on(self.upload_stream):
                frames = self._upload_frames(slot, images)
                letterbox_scales = letterbox_frames(frames, input_hw, preprocess, self.staged[slot],
                                                    [picture.layout for picture in batch.pictures])  # fmt: skip
            scales = source_scales(letterbox_scales, batch.prescales())
            self.runtime.record(self.uploaded[slot], self.upload_stream)
            self._compute(slot, count, run, to_host=False)

        def detections() -> Decoded:
            found = postprocess_on_device(self.output[slot][:count].float(), scales, batch.source_hw(),
                                          batch.conf_threshold, batch.iou_threshold)  # fmt: skip
            return Decoded.uncounted(found)

        return self._pending(slot, what, detections)

    def _upload_frames(self, slot: int, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The frames into the slot's pinned buffer, then to the device on the upload stream; device views of each."""
        sizes = [int(image.nbytes) for image in images]
        total = sum(sizes)
        if self.host_frames[slot].numel() < total:  # grows to the largest batch of frames seen, then stays
            self.host_frames[slot] = self.runtime.pinned((total,), torch.uint8)
            self.dev_frames[slot] = self.runtime.empty((total,), torch.uint8)
        host = self.host_frames[slot].numpy()
        offset = 0
        for image, size in zip(images, sizes):
            host[offset : offset + size] = np.ascontiguousarray(image).reshape(-1)
            offset += size
        self.runtime.copy(self.dev_frames[slot][:total], self.host_frames[slot][:total], self.upload_stream, "h2d", slot)
        starts = np.cumsum([0, *sizes[:-1]])
        return [self.dev_frames[slot][int(start) : int(start) + size].view(image.shape)
                for start, size, image in zip(starts, sizes, images)]  # fmt: skip

    def _compute(self, slot: int, count: int, run: Run, to_host: bool) -> None:
        """The compute stream's half: after the upload's event, run -> output[slot] (-> host), then record done."""
        rt, stream = self.runtime, self.compute_stream
        rt.wait_event(stream, self.uploaded[slot])
        output = self.output[slot][:count]
        with rt.on(stream):
            result = run(self.staged[slot][:count], output)
        if result is not None:
            rt.copy(output, result, stream, "output", slot)
        if to_host:
            rt.copy(self.host_out[slot][:count], output, stream, "d2h", slot)
        rt.record(self.done[slot], stream)

    def _pending(self, slot: int, what: str, finish: Callable[[], object]) -> SlotPending:
        pending = SlotPending(self, slot, what, finish)
        self.in_flight[slot] = pending
        return pending

    def close(self) -> None:
        """Wait for both streams, even after a failed submit left work queued without a Pending, so that no stream
        still reads a buffer about to be freed."""
        try:
            with self.runtime.guard():
                self.runtime.synchronize(self.upload_stream)
                self.runtime.synchronize(self.compute_stream)
        except RuntimeError as exc:
            log.warning("%s: %s on %s while closing", self.label, exc, self.runtime.device)
        self.in_flight = [None] * SLOTS
