"""TensorRT 10 on an NVIDIA GPU, with PyTorch's CUDA runtime for memory and streams (no pycuda).

Only what is TensorRT's is here: the engine from the cache that
streamd.backends.tensorrt_build keeps (built there on first use: an engine is
tied to its GPU and TensorRT version), its execution context, the tensor
addresses, and execute_async_v3 on the compute stream. Buffers, streams,
events, the upload, the device letterbox and the threshold + NMS are
streamd.backends.cuda_slots and device_ops, the same code the torch backend
runs (and its GPU tests check): two batches in flight, the upload of batch
k+1 overlapping the engine on batch k, every call under the backend's
device in the calling thread.

TensorRTBackend is a base.Backend that takes BGR and yuv420p pictures:
`submit(FrameBatch)` takes uint8 pictures as decoded and gives Detections in
source pixels (letterbox into the engine's input, engine, threshold and NMS
on its output, all on the device); `submit_tensor` takes a letterboxed
float32 [N, 3, H, W] batch and gives the engine's float32 [N, A, 5 + C] on
the host.

`tensorrt` and `torch` are imported only when this backend is built.
"""

from __future__ import annotations

import logging

import numpy as np

from streamd.backends.base import FrameBatch, check_count
from streamd.backends.tensorrt_build import (
    engine_path, import_tensorrt, import_torch, key_note, serialize_engine, trt_logger, write_cache,
)  # fmt: skip
from streamd.config import TensorRTConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)


class TensorRTBackend:
    """A TensorRT engine for one bundle on one GPU, for batches of 1..max_batch frames."""

    name = "tensorrt"
    pixel_formats = frozenset({"bgr24", "yuv420p"})

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
        from streamd.backends import cuda_slots  # imports torch: only once this backend is chosen

        self._trt, self._torch, self._cuda_slots = trt, torch, cuda_slots
        self.max_batch = max_batch
        self.precision = config.precision
        self.input_hw = tuple(bundle.meta.input_hw)
        self.preprocess = bundle.meta.preprocess
        self.device = torch.device(f"cuda:{config.device}")
        self.runtime = cuda_slots.CudaRuntime(self.device, "backend tensorrt")
        gpu_name = self.runtime.gpu_name
        self._trt_runtime = trt.Runtime(trt_logger(trt))
        self.engine_path = engine_path(bundle, gpu_name, trt.__version__, config.precision, max_batch, config.engine_cache_dir)
        with self.runtime.guard():  # the engine, its context and buffers belong to this device
            self.engine = self._load_cached() or self._build_and_cache(bundle, config, gpu_name)
            self._bind(bundle)

    def _load_cached(self):
        if not self.engine_path.is_file():
            return None
        engine = self._trt_runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
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
        engine = self._trt_runtime.deserialize_cuda_engine(data)
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
        height, width = self.input_hw
        input_shape = (self.max_batch, 3, height, width)
        if not self.context.set_input_shape(self.input_name, input_shape):
            raise BackendError(f"engine {self.engine_path}: input shape {input_shape} is outside its profile")
        output_shape = tuple(self.context.get_tensor_shape(self.output_name))
        in_dtype = _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        out_dtype = _torch_dtype(torch, trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.slots = self._cuda_slots.CudaSlots(self.runtime, "backend tensorrt", self.max_batch, input_shape[1:], in_dtype,
                                                output_shape[1:], out_dtype)  # fmt: skip

    def _execute(self, images, output) -> None:
        """The engine on the compute stream (cuda_slots.Run): images [n, 3, H, W] -> output [n, A, 5 + C], in place.

        One execution context serves both slots: shape and addresses are read at enqueue, and one thread submits.
        """
        if not self.context.set_input_shape(self.input_name, tuple(images.shape)):
            raise BackendError(f"backend tensorrt: input shape {tuple(images.shape)} is outside the engine's profile")
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        if not self.context.execute_async_v3(self.runtime.handle(self.slots.compute_stream)):
            raise BackendError(
                f"backend tensorrt: execute_async_v3 failed on {self.device} for a batch of {images.shape[0]} (see the TensorRT log)"
            )

    def submit_tensor(self, tensor: np.ndarray):
        """Start a letterboxed float32 [N, 3, H, W] batch (N <= max_batch); wait() on the result gives float32 [N, A, 5 + C]."""
        check_count(self, int(tensor.shape[0]))
        return self.slots.submit_tensor(np.ascontiguousarray(tensor, dtype=np.float32), self._execute)

    def submit(self, batch: FrameBatch):
        """Start up to max_batch pictures (base.Backend); wait() gives one Detections per picture, in source pixels."""
        batch.check(self)
        return self.slots.submit(batch, self.input_hw, self.preprocess, self._execute)

    def close(self) -> None:
        """Wait for both streams (even after a failed submit), then release the context and engine."""
        if self.slots is not None:
            self.slots.close()
        self.slots = None
        self.context = None
        self.engine = None


def _torch_dtype(torch, numpy_dtype) -> object:
    return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype
