"""PyTorch on a CUDA GPU or the CPU: the bundle's weights.safetensors in pixeltable-yolox's YOLOX.

The model is rebuilt from bundle.json's `yolox` fields, loaded from
safetensors (never a pickle), its batch-norms folded into the convolutions,
and the head run without YOLOX's own decode (`decode_in_inference` builds
its grids on the CPU at every call, which breaks CUDA-graph capture):
`GridDecode` holds the grids and strides of the bundle's input size as
device buffers instead. `submit()` keeps the Backend protocol: it returns
the decoded float32 [N, A, 5 + C], the same rows as model.onnx, which
ResultsStage thresholds and NMSes with NumPy.

Two more entry points carry the rest of the GPU path, for a caller that
has the frames rather than a letterboxed batch:

- `submit_frames(frames)`: uint8 HxWx3 BGR frames are uploaded as they are
  and letterboxed on the device (`letterbox_frames`, within one grey level of
  streamd.model.preprocess.letterbox), then run like `submit()`.
- `detect(frames, conf, iou)`: the same, then the score threshold and
  class-aware NMS (`torchvision.ops.batched_nms`) on the device; only the
  detections come back (`postprocess_on_device`).

On CUDA (`device: cuda:N`), everything runs under that device in the calling
thread. Two slots each hold a pinned host buffer and a device staging
buffer, allocated once (the frame buffers grow to the largest frame seen).
The upload, and for frames the letterbox, run on an upload stream; the model
runs on a compute stream that waits on the upload's event, so the upload of
batch k+1 overlaps the model on batch k. The model's output goes back to a
pinned host buffer on the compute stream, and `wait()` blocks on that
slot's (blocking, not spinning) event. With `cuda_graphs`, one graph per
batch-size bucket (1, 2, 4, ... max_batch) is captured at start, warm-up
included, and a batch is padded to its bucket. fp32 on CUDA lets cuDNN use
TF32 convolutions (PyTorch's default). On the CPU, submit() simply runs the
model in fp32 and returns a ready result.

`torch`, `torchvision` and `yolox` are imported only here, and this module
only when a torch backend is built (the `gpu` extra installs them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch

from streamd.backends.base import Ready
from streamd.backends.device_ops import GridDecode, letterbox_frames, postprocess_on_device
from streamd.config import TorchConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle, Preprocess
from streamd.model.detections import Detections

log = logging.getLogger(__name__)

SLOTS = 2  # batches in flight: one uploading while the other computes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reexport_hint(bundle: Bundle) -> str:
    return (
        f"{bundle.path} has no weights.safetensors, which the torch backend runs: re-export it with "
        f"`trainer export RUN_DIR -o {bundle.path}` (a bundle whose checkpoint is gone: "
        f"`python -m trainer.export.recover {bundle.path} EXPERIMENT.yaml`), or use backend onnxruntime or tensorrt"
    )


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a CUDA graph is captured for: powers of two below max_batch, and max_batch."""
    buckets = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return (*buckets, max_batch)


class YoloxDecoded(torch.nn.Module):
    """The YOLOX model and the decode: float [N, 3, H, W] -> float32 [N, A, 5 + C], model.onnx's output."""

    def __init__(self, model: torch.nn.Module, decode: GridDecode):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.model(images))


def load_model(bundle: Bundle) -> YoloxDecoded:
    """The bundle's YOLOX on the CPU in fp32, eval mode, batch-norm folded, decode with precomputed grids."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from yolox.config import YoloxConfig
    from yolox.utils import fuse_model

    arch = bundle.meta.yolox
    if bundle.weights_path is None or arch is None:
        raise BackendError(reexport_hint(bundle))
    # get_model() sets YOLOX's batch-norm eps (1e-3), which the weights were trained and folded with.
    config = YoloxConfig(name=bundle.meta.architecture, num_classes=arch.num_classes, depth=arch.depth,
                         width=arch.width, depthwise=arch.depthwise, act=arch.act)  # fmt: skip
    model = config.get_model()
    if tuple(model.head.strides) != tuple(arch.strides):
        raise BackendError(f"{bundle.path}: yolox.strides {list(arch.strides)}, but YOLOX's head has {model.head.strides}")
    try:
        model.load_state_dict(load_file(bundle.weights_path, device="cpu"))
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise BackendError(f"{bundle.weights_path}: does not fit a {bundle.meta.architecture} as bundle.json describes: {exc}") from exc
    model.eval()
    model.head.decode_in_inference = False
    fuse_model(model)
    return YoloxDecoded(model, GridDecode(tuple(bundle.meta.input_hw), arch.strides)).eval()


# --- the backend -----------------------------------------------------------------------------------


class TorchBackend:
    """streamd.backends.base.Backend on PyTorch, for batches of 1..max_batch frames."""

    name = "torch"

    def __init__(self, bundle: Bundle, config: TorchConfig, max_batch: int = 8):
        self.max_batch = max_batch
        self.input_hw = tuple(bundle.meta.input_hw)
        self.preprocess = bundle.meta.preprocess
        self.precision = config.compute_precision
        self.device = torch.device(config.device)
        net = load_model(bundle)
        self.rows = (sum((self.input_hw[0] // s) * (self.input_hw[1] // s) for s in bundle.meta.yolox.strides),
                     5 + bundle.meta.yolox.num_classes)  # fmt: skip
        if self.device.type == "cuda":
            self._cuda = _CudaRunner(net, self.device, DTYPES[self.precision], self.input_hw, self.rows, max_batch,
                                     config.cuda_graphs)  # fmt: skip
            log.info("torch backend on %s (%s), %s, CUDA graphs %s", self.device, self._cuda.gpu_name, self.precision,
                     "for batches " + "/".join(map(str, self._cuda.buckets)) if config.cuda_graphs else "off")  # fmt: skip
        else:
            self._cuda = None
            self._net = net
            log.info("torch backend on the CPU (fp32, %d threads)", torch.get_num_threads())

    def _check_count(self, count: int) -> None:
        if not 1 <= count <= self.max_batch:
            raise BackendError(f"backend torch: batch of {count} frames, this backend takes 1..{self.max_batch}")

    def submit(self, batch: np.ndarray):
        """Start a letterboxed float32 [N, 3, H, W] batch; wait() on the result gives float32 [N, A, 5 + C]."""
        self._check_count(int(batch.shape[0]))
        if self._cuda is not None:
            return self._cuda.submit_batch(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            return Ready(self._net(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy())

    def submit_frames(self, frames_bgr: Sequence[np.ndarray]) -> tuple[object, np.ndarray]:
        """Upload uint8 HxWx3 BGR frames, letterbox them on the device and start the model.

        Returns the Pending (wait() -> float32 [N, A, 5 + C]) and the float32 [N] letterbox scales.
        """
        self._check_count(len(frames_bgr))
        if self._cuda is not None:
            pending, scales = self._cuda.submit_frames(frames_bgr, self.preprocess)
            return pending, np.asarray(scales, np.float32)
        with torch.inference_mode():
            batch = torch.empty((len(frames_bgr), 3, *self.input_hw))
            scales = letterbox_frames([torch.from_numpy(f) for f in frames_bgr], self.input_hw, self.preprocess, batch)
            return Ready(self._net(batch).numpy()), np.asarray(scales, np.float32)

    def detect(self, frames_bgr: Sequence[np.ndarray], conf_threshold: float, iou_threshold: float) -> list[Detections]:
        """The whole GPU path for up to max_batch frames: letterbox, model, threshold and NMS on the device."""
        self._check_count(len(frames_bgr))
        source_hw = [(int(f.shape[0]), int(f.shape[1])) for f in frames_bgr]
        if self._cuda is not None:
            return self._cuda.detect(frames_bgr, self.preprocess, source_hw, conf_threshold, iou_threshold)
        with torch.inference_mode():
            batch = torch.empty((len(frames_bgr), 3, *self.input_hw))
            scales = letterbox_frames([torch.from_numpy(f) for f in frames_bgr], self.input_hw, self.preprocess, batch)
            return postprocess_on_device(self._net(batch), scales, source_hw, conf_threshold, iou_threshold)

    def close(self) -> None:
        if self._cuda is not None:
            self._cuda.close()
        self._cuda = self._net = None


class _CudaPending:
    """One batch in a CUDA slot; wait() blocks on the slot's event and copies the output out of the slot."""

    __slots__ = ("_runner", "_slot", "_count", "_output", "_lock")

    def __init__(self, runner: _CudaRunner, slot: int, count: int):
        self._runner, self._slot, self._count = runner, slot, count
        self._output: np.ndarray | None = None
        self._lock = threading.Lock()  # the results worker and a submit reusing the slot may both wait

    def wait(self) -> np.ndarray:
        """float32 [N, A, 5 + C], a copy that outlives the slot's reuse."""
        with self._lock:
            if self._output is None:
                runner = self._runner
                try:
                    runner.done[self._slot].synchronize()
                except RuntimeError as exc:  # CUDA errors of the batch surface here
                    raise BackendError(f"backend torch: batch failed on {runner.device}: {exc}") from exc
                self._output = runner.host_out[self._slot][: self._count].numpy().copy()
                if runner.in_flight[self._slot] is self:
                    runner.in_flight[self._slot] = None
            return self._output


class _CudaRunner:
    """The CUDA half of TorchBackend: slots, streams, events and graphs on one device."""

    def __init__(self, net: YoloxDecoded, device: torch.device, dtype: torch.dtype, input_hw: tuple[int, int],
                 rows: tuple[int, int], max_batch: int, cuda_graphs: bool):  # fmt: skip
        if not torch.cuda.is_available():
            raise BackendError(f"backend torch: device {device}, but no CUDA GPU is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendError(f"backend torch: device {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        self.device, self.dtype, self.input_hw, self.max_batch = device, dtype, input_hw, max_batch
        self.buckets = batch_buckets(max_batch) if cuda_graphs else ()
        self.in_flight: list[_CudaPending | None] = [None] * SLOTS
        self._next_slot = 0
        height, width = input_hw
        try:
            with torch.cuda.device(device):
                self.gpu_name = torch.cuda.get_device_name(device)
                torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
                self.net = net.to(device=device, dtype=dtype)
                self.net.decode.float()  # grids and strides stay float32: the decode runs in float32
                self.upload_stream = torch.cuda.Stream(device)
                self.compute_stream = torch.cuda.Stream(device)
                shape = (max_batch, 3, height, width)
                self.host_in = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(SLOTS)]
                self.staged = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(SLOTS)]
                self.host_out = [torch.empty((max_batch, *rows), dtype=torch.float32, pin_memory=True) for _ in range(SLOTS)]
                self.host_frames = [torch.empty(0, dtype=torch.uint8, pin_memory=True) for _ in range(SLOTS)]
                self.dev_frames = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(SLOTS)]
                self.uploaded = [torch.cuda.Event(blocking=True) for _ in range(SLOTS)]
                self.done = [torch.cuda.Event(blocking=True) for _ in range(SLOTS)]
                # The model reads static_in and writes static_out; graphs are captured on their prefixes.
                self.static_in = torch.full(shape, 114.0, dtype=dtype, device=device)
                self.static_out = torch.empty((max_batch, *rows), dtype=torch.float32, device=device)
                self.graphs = self._capture() if cuda_graphs else {}
        except RuntimeError as exc:  # out of memory, a bad device, a failed capture
            raise BackendError(f"backend torch: cannot set up {device} for batches of {max_batch}: {exc}") from exc

    def _capture(self) -> dict[int, torch.cuda.CUDAGraph]:
        """One graph per bucket, sharing one memory pool (they only ever replay one after another, on one stream)."""
        graphs, pool = {}, torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(side):  # warm-up before capture: cuDNN autotuning and lazy init happen here
                for bucket in self.buckets:
                    for _ in range(3):
                        self.static_out[:bucket].copy_(self.net(self.static_in[:bucket]))
            torch.cuda.current_stream(self.device).wait_stream(side)
            for bucket in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool blocks
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.static_out[:bucket].copy_(self.net(self.static_in[:bucket]))
                graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        return graphs

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the model on a float32 [n, 3, H, W] device batch on the current stream; float32 [n, A, 5 + C].

        With graphs: the batch goes into the bucket's static input and its graph replays; the result is a
        view of static_out, valid until the next call.
        """
        count = batch.shape[0]
        if not self.graphs:
            return self.net(batch.to(self.dtype))
        bucket = next(b for b in self.buckets if b >= count)
        self.static_in[:count].copy_(batch)
        self.graphs[bucket].replay()
        return self.static_out[:count]

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot = (slot + 1) % SLOTS
        previous = self.in_flight[slot]
        if previous is not None:
            previous.wait()  # its buffers are still the input and output of an uncollected batch
        return slot

    def _launch(self, slot: int, count: int) -> _CudaPending:
        """The compute half, after the upload's event: the model on staged[slot], the output to host_out[slot]."""
        self.compute_stream.wait_event(self.uploaded[slot])
        with torch.cuda.stream(self.compute_stream), torch.inference_mode():
            output = self._forward(self.staged[slot][:count])
            self.host_out[slot][:count].copy_(output, non_blocking=True)
            self.done[slot].record(self.compute_stream)
        pending = _CudaPending(self, slot, count)
        self.in_flight[slot] = pending
        return pending

    def submit_batch(self, batch: np.ndarray) -> _CudaPending:
        count = batch.shape[0]
        try:
            with torch.cuda.device(self.device):
                slot = self._take_slot()
                self.host_in[slot][:count].copy_(torch.from_numpy(batch))
                with torch.cuda.stream(self.upload_stream):
                    self.staged[slot][:count].copy_(self.host_in[slot][:count], non_blocking=True)
                    self.uploaded[slot].record(self.upload_stream)
                return self._launch(slot, count)
        except RuntimeError as exc:
            raise BackendError(f"backend torch: CUDA error on a batch of {count}: {exc}") from exc

    def _upload_frames(self, slot: int, frames_bgr: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Copy frames into the slot's pinned buffer and up to the device on the upload stream; device views."""
        sizes = [int(f.nbytes) for f in frames_bgr]
        total = sum(sizes)
        if self.host_frames[slot].numel() < total:  # grows to the largest batch of frames seen, then stays
            self.host_frames[slot] = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self.dev_frames[slot] = torch.empty(total, dtype=torch.uint8, device=self.device)
        host = self.host_frames[slot].numpy()
        views, offset = [], 0
        for frame, size in zip(frames_bgr, sizes):
            host[offset : offset + size] = np.ascontiguousarray(frame).reshape(-1)
            views.append((offset, size, frame.shape))
            offset += size
        self.dev_frames[slot][:total].copy_(self.host_frames[slot][:total], non_blocking=True)
        return [self.dev_frames[slot][start : start + size].view(shape) for start, size, shape in views]

    def _stage_frames(self, frames_bgr: Sequence[np.ndarray], preprocess: Preprocess) -> tuple[int, list[float]]:
        """Take a slot, upload the frames and letterbox them into staged[slot] on the upload stream; slot, scales."""
        slot = self._take_slot()
        with torch.cuda.stream(self.upload_stream), torch.inference_mode():
            frames = self._upload_frames(slot, frames_bgr)
            scales = letterbox_frames(frames, self.input_hw, preprocess, self.staged[slot])
            self.uploaded[slot].record(self.upload_stream)
        return slot, scales

    def submit_frames(self, frames_bgr: Sequence[np.ndarray], preprocess: Preprocess) -> tuple[_CudaPending, list[float]]:
        try:
            with torch.cuda.device(self.device):
                slot, scales = self._stage_frames(frames_bgr, preprocess)
                return self._launch(slot, len(frames_bgr)), scales
        except RuntimeError as exc:
            raise BackendError(f"backend torch: CUDA error on {len(frames_bgr)} frames: {exc}") from exc

    def detect(self, frames_bgr, preprocess: Preprocess, source_hw, conf_threshold: float, iou_threshold: float) -> list[Detections]:
        count = len(frames_bgr)
        try:
            with torch.cuda.device(self.device):
                slot, scales = self._stage_frames(frames_bgr, preprocess)
                self.compute_stream.wait_event(self.uploaded[slot])
                with torch.cuda.stream(self.compute_stream), torch.inference_mode():
                    output = self._forward(self.staged[slot][:count])
                    return postprocess_on_device(output, scales, source_hw, conf_threshold, iou_threshold)
        except RuntimeError as exc:
            raise BackendError(f"backend torch: CUDA error on {count} frames: {exc}") from exc

    def close(self) -> None:
        """Wait for what is in flight, even after a failed submit, so no stream still reads a freed buffer."""
        try:
            with torch.cuda.device(self.device):
                self.upload_stream.synchronize()
                self.compute_stream.synchronize()
        except RuntimeError as exc:
            log.warning("backend torch: %s while closing: %s", self.device, exc)
        self.in_flight = [None] * SLOTS
        self.graphs = {}
