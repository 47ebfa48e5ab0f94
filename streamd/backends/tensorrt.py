"""TensorRT 10 on an NVIDIA GPU, with PyTorch's CUDA runtime for memory and streams (no pycuda).

The engine is built from the bundle's `model.onnx` on the machine that runs
it (an engine is tied to its GPU and TensorRT version) and cached under a
key of (onnx sha256, GPU name, TensorRT version, precision, max batch), in
BUNDLE/engines/ unless the config names another folder. It has one
optimization profile for a dynamic batch of 1..max_batch.

Copies overlap compute: each batch goes to one of two slots (pinned host
input, device input, device output, pinned host output). The H2D copy runs
on a copy stream and the engine on a compute stream that waits for that copy
by a CUDA event, so the copy of batch k+1 (`submit`) runs while batch k
computes; `wait()` on a batch's handle returns its output.

`build_engine` builds into the same cache ahead of time (`trainer
build-engine`, which also brings an int8 calibrator); the daemon then loads
the engine instead of building it.

`tensorrt` and `torch` are imported only here, only when this backend is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from functools import cache
from pathlib import Path

import numpy as np

from streamd.config import TensorRTConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)

SLOTS = 2  # batches in flight: one copying in while the other computes
SUPPORTED_MAJORS = (10,)


def engine_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> str:
    """The cache file stem of an engine: readable parts plus a hash of the whole key."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    digest = hashlib.sha256(f"{onnx_sha256}|{gpu_name}|{trt_version}|{precision}|{max_batch}".encode()).hexdigest()
    return f"{onnx_sha256[:12]}-{gpu}-trt{trt_version}-{precision}-b{max_batch}-{digest[:8]}"


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(
            "backend tensorrt: the tensorrt Python package is not installed "
            "(pip install tensorrt matching your CUDA driver), or use backend: onnxruntime"
        ) from exc
    major = tensorrt.__version__.split(".")[0]
    if not major.isdigit() or int(major) not in SUPPORTED_MAJORS:
        # TensorRT 11 removed BuilderFlag.FP16/INT8 and the implicit int8 calibrator this backend uses.
        raise BackendError(
            f"backend tensorrt: TensorRT {'/'.join(map(str, SUPPORTED_MAJORS))}.x is supported, found "
            f"{tensorrt.__version__} (pip install 'tensorrt-cu13>=10.13,<11')"
        )
    return tensorrt


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendError("backend tensorrt: torch (the CUDA runtime streamd uses with TensorRT) is not installed") from exc
    if not torch.cuda.is_available():
        raise BackendError("backend tensorrt: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return torch


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


@cache
def _trt_logger(trt):
    """One TensorRT logger per process: TensorRT warns when builders and runtimes get different ones."""
    return trt.Logger(trt.Logger.WARNING)


def _gpu_name(torch, device: int) -> str:
    try:
        torch.cuda.set_device(device)
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError) as exc:
        raise BackendError(f"backend tensorrt: CUDA device {device} is not usable: {exc}") from exc


def engine_path(bundle: Bundle, gpu_name: str, trt_version: str, precision: str, max_batch: int, cache_dir: Path | None = None) -> Path:
    """Where the engine of this key lives: CACHE_DIR (default BUNDLE/engines) / KEY.engine."""
    return (cache_dir or bundle.path / "engines") / f"{engine_key(bundle.sha256, gpu_name, trt_version, precision, max_batch)}.engine"


def _serialize(trt, bundle: Bundle, precision: str, max_batch: int, workspace_mb: int, calibrator=None) -> bytes:
    """Parse model.onnx and build a serialized engine with one profile for batch 1..max_batch."""
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{bundle.onnx_path}: TensorRT cannot parse the model: {problems}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without int8 kernels fall back to fp16
    if precision == "int8":
        has_qdq = any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
        if calibrator is None and not has_qdq:
            raise BackendError(
                f"{bundle.onnx_path}: precision int8 needs calibration scales: build the engine with "
                "`trainer build-engine BUNDLE --precision int8 --data EXPERIMENT.yaml` (streamd then loads it "
                "from the cache), export a model with Q/DQ nodes, or use fp16"
            )
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            config.int8_calibrator = calibrator
    height, width = bundle.meta.input_hw
    profile = builder.create_optimization_profile()
    profile.set_shape(bundle.meta.onnx.input_name, (1, 3, height, width), (max_batch, 3, height, width), (max_batch, 3, height, width))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{bundle.onnx_path}: TensorRT could not build an engine (see the log above)")
    return bytes(serialized)


def _write_cache(path: Path, data: bytes, key: dict) -> None:
    """Write the engine atomically (tmp + rename) with a JSON note of its key beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(key, indent=2) + "\n")
    log.info("cached TensorRT engine %s", path)


def build_engine(
    bundle: Bundle,
    *,
    precision: str = "fp16",
    max_batch: int = 8,
    device: int = 0,
    engine_cache_dir: Path | None = None,
    workspace_mb: int = 2048,
    calibrator=None,
) -> Path:
    """Build the engine of `bundle` for this GPU into the cache the daemon reads (or find it there); its path.

    For `trainer build-engine`: ahead of time, and for int8 with the
    trainer's calibrator (a `tensorrt.IInt8Calibrator`). max_batch and
    engine_cache_dir must match the daemon's config, since both select the file.
    """
    trt, torch = _import_tensorrt(), _import_torch()
    gpu_name = _gpu_name(torch, device)
    path = engine_path(bundle, gpu_name, trt.__version__, precision, max_batch, engine_cache_dir)
    if path.is_file():
        log.info("TensorRT engine already cached: %s", path)
        return path
    log.info("building a TensorRT %s engine for %s on %s (minutes)", precision, bundle.onnx_path, gpu_name)
    data = _serialize(trt, bundle, precision, max_batch, workspace_mb, calibrator)
    try:
        _write_cache(path, data, _key_note(bundle, gpu_name, trt.__version__, precision, max_batch))
    except OSError as exc:
        raise BackendError(f"cannot write the TensorRT engine to {path}: {exc}") from exc
    return path


def _key_note(bundle: Bundle, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> dict:
    return {"onnx_sha256": bundle.sha256, "gpu_name": gpu_name, "tensorrt_version": trt_version,
            "precision": precision, "max_batch": max_batch}  # fmt: skip


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
        trt = _import_tensorrt()
        torch = _import_torch()
        self._trt, self._torch = trt, torch
        self.max_batch = max_batch
        self.precision = config.precision
        self.device = torch.device(f"cuda:{config.device}")
        gpu_name = _gpu_name(torch, config.device)
        self._runtime = trt.Runtime(_trt_logger(trt))
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
        data = _serialize(self._trt, bundle, config.precision, self.max_batch, config.workspace_mb)
        try:
            _write_cache(self.engine_path, data, _key_note(bundle, gpu_name, self._trt.__version__, self.precision, self.max_batch))
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
