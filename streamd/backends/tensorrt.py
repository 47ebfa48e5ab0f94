"""TensorRT 10 on an NVIDIA GPU, with PyTorch's CUDA runtime for memory and streams (no pycuda).

The engine comes from the cache streamd.backends.tensorrt_build keeps (built
there on first use: an engine is tied to its GPU and TensorRT version).

Copies overlap compute: each batch goes to one of two slots (pinned host
input, device input, device output, pinned host output). The H2D copy runs
on a copy stream and the engine on a compute stream that waits for that copy
by a CUDA event, so the copy of batch k+1 (`submit`) runs while batch k
computes; `wait()` on a batch's handle returns its output.

`tensorrt` and `torch` are imported only here, only when this backend is built.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from streamd.backends.tensorrt_build import (
    cuda_device_name, engine_path, import_tensorrt, import_torch, key_note, serialize_engine, trt_logger, write_cache,
)  # fmt: skip
from streamd.config import TensorRTConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)

SLOTS = 2  # batches in flight: one copying in while the other computes


class _Pending:
    """The output of one submitted batch; `wait()` blocks until it is on the host.

    Thread-safe: the results worker waits on it while the submit worker may
    wait on the same handle before reusing its slot.
    """

    __slots__ = ("_backend", "_slot", "_count", "_output", "_lock")

    def __init__(self, backend: TensorRTBackend, slot: int, count: int):
        self._backend = backend
        self._slot = slot
        self._count = count
        self._output: np.ndarray | None = None
        self._lock = threading.Lock()

    def wait(self) -> np.ndarray:
        """float32 [N, A, 5 + C], a copy that outlives the slot's reuse."""
        with self._lock:
            if self._output is None:
                backend = self._backend
                try:
                    backend._done[self._slot].synchronize()
                except RuntimeError as exc:  # CUDA errors surface here as RuntimeError
                    raise BackendError(f"TensorRT batch failed on the GPU: {exc}") from exc
                self._output = backend._host_out[self._slot][: self._count].numpy().astype(np.float32, copy=True)
                if backend._in_flight[self._slot] is self:
                    backend._in_flight[self._slot] = None
            return self._output


class TensorRTBackend:
    """A TensorRT engine for one bundle on one GPU, for batches of 1..max_batch frames."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, config: TensorRTConfig, max_batch: int = 8):
        try:
            self._setup(bundle, config, max_batch)
        except BackendError:
            raise
        except Exception as exc:  # any TensorRT or CUDA setup failure: `auto` falls back from a BackendError
            raise BackendError(f"backend tensorrt: setup failed: {type(exc).__name__}: {exc}") from exc

    def _setup(self, bundle: Bundle, config: TensorRTConfig, max_batch: int) -> None:
        trt = import_tensorrt()
        torch = import_torch()
        self._trt, self._torch = trt, torch
        self.max_batch = max_batch
        self.precision = config.precision
        self.device = torch.device(f"cuda:{config.device}")
        gpu_name = cuda_device_name(torch, config.device)
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine_path = engine_path(bundle, gpu_name, trt.__version__, config.precision, max_batch, config.engine_cache_dir)
        self.engine = self._load_cached() or self._build_and_cache(bundle, config, gpu_name)
        self._bind(bundle)

    def _load_cached(self):
        if not self.engine_path.is_file():
            return None
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            log.warning("engine cache %s does not deserialize; rebuilding it", self.engine_path)
            return None
        log.info("loaded TensorRT engine %s", self.engine_path)
        return engine

    def _build_and_cache(self, bundle: Bundle, config: TensorRTConfig, gpu_name: str):
        log.info("building a TensorRT %s engine for %s on %s (once per GPU, minutes)", config.precision, bundle.onnx_path, gpu_name)
        data = serialize_engine(self._trt, bundle, config.precision, self.max_batch, config.workspace_mb)
        try:
            write_cache(self.engine_path, data, key_note(bundle, gpu_name, self._trt.__version__, self.precision, self.max_batch))
        except OSError as exc:  # a read-only bundle folder only costs a rebuild at the next start
            log.warning("cannot cache the TensorRT engine at %s (%s); it will be rebuilt next start", self.engine_path, exc)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(f"{bundle.onnx_path}: the engine TensorRT just built does not deserialize")
        return engine

    # --- buffers and execution ------------------------------------------------------------------

    def _bind(self, bundle: Bundle) -> None:
        trt, torch = self._trt, self._torch
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name = bundle.meta.onnx.input_name
        self.output_name = bundle.meta.onnx.output_name
        if inputs != [self.input_name] or self.output_name not in outputs:
            raise BackendError(
                f"engine {self.engine_path}: expected input {self.input_name!r} and output {self.output_name!r}, "
                f"found inputs {inputs} and outputs {outputs}"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"engine {self.engine_path}: cannot create an execution context (GPU memory?)")
        height, width = bundle.meta.input_hw
        input_shape = (self.max_batch, 3, height, width)
        if not self.context.set_input_shape(self.input_name, input_shape):
            raise BackendError(f"engine {self.engine_path}: input shape {input_shape} is outside its profile")
        output_shape = tuple(self.context.get_tensor_shape(self.output_name))
        in_dtype = _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        out_dtype = _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        try:
            self._host_in = [torch.empty(input_shape, dtype=in_dtype, pin_memory=True) for _ in range(SLOTS)]
            self._dev_in = [torch.empty(input_shape, dtype=in_dtype, device=self.device) for _ in range(SLOTS)]
            self._dev_out = [torch.empty(output_shape, dtype=out_dtype, device=self.device) for _ in range(SLOTS)]
            self._host_out = [torch.empty(output_shape, dtype=out_dtype, pin_memory=True) for _ in range(SLOTS)]
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
            # blocking: wait() sleeps on the event instead of spinning a core the decoders need
            self._copied = [torch.cuda.Event(blocking=True) for _ in range(SLOTS)]
            self._done = [torch.cuda.Event(blocking=True) for _ in range(SLOTS)]
        except RuntimeError as exc:
            raise BackendError(f"backend tensorrt: cannot allocate buffers for batch {self.max_batch}: {exc}") from exc
        self._in_flight: list[_Pending | None] = [None] * SLOTS
        self._next_slot = 0

    def submit(self, batch: np.ndarray) -> _Pending:
        """Start a float32 [N, 3, H, W] batch (N <= max_batch); returns at once with a handle to wait on.

        The H2D copy goes on the copy stream; the engine and the D2H copy on the
        compute stream, after the copy's event. With two slots, a batch submitted
        while another computes copies in during that compute.
        """
        torch = self._torch
        count = int(batch.shape[0])
        if not 1 <= count <= self.max_batch:
            raise BackendError(f"backend tensorrt: batch of {count} frames, engine takes 1..{self.max_batch}")
        slot = self._next_slot
        self._next_slot = (slot + 1) % SLOTS
        previous = self._in_flight[slot]
        if previous is not None:
            previous.wait()  # the slot's buffers are still the output of an uncollected batch
        try:
            self._host_in[slot][:count].copy_(torch.from_numpy(np.ascontiguousarray(batch)))
            with torch.cuda.stream(self._copy_stream):
                self._dev_in[slot][:count].copy_(self._host_in[slot][:count], non_blocking=True)
                self._copied[slot].record(self._copy_stream)
            self._compute_stream.wait_event(self._copied[slot])
            height, width = batch.shape[2], batch.shape[3]
            if not self.context.set_input_shape(self.input_name, (count, 3, height, width)):
                raise BackendError(f"backend tensorrt: input shape {tuple(batch.shape)} is outside the engine's profile")
            self.context.set_tensor_address(self.input_name, self._dev_in[slot].data_ptr())
            self.context.set_tensor_address(self.output_name, self._dev_out[slot].data_ptr())
            if not self.context.execute_async_v3(self._compute_stream.cuda_stream):
                raise BackendError("backend tensorrt: execute_async_v3 failed (see the TensorRT log)")
            with torch.cuda.stream(self._compute_stream):
                self._host_out[slot][:count].copy_(self._dev_out[slot][:count], non_blocking=True)
                self._done[slot].record(self._compute_stream)
        except RuntimeError as exc:
            raise BackendError(f"backend tensorrt: CUDA error on a batch of {count}: {exc}") from exc
        pending = _Pending(self, slot, count)
        self._in_flight[slot] = pending
        return pending

    def close(self) -> None:
        """Wait for both streams, even after a failed submit() left work queued without a handle."""
        try:
            self._copy_stream.synchronize()
            self._compute_stream.synchronize()
        except RuntimeError as exc:
            log.warning("backend tensorrt: %s while closing", exc)
        self._in_flight = [None] * SLOTS
        self.context = None
        self.engine = None


def _torch_dtype(torch, numpy_dtype) -> object:
    return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype
