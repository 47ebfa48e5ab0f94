"""Building and caching TensorRT engines for streamd's TensorRT backend (and `trainer build-engine`).

The engine is built from the bundle's `model.onnx` on the machine that runs
it (an engine is tied to its GPU and TensorRT version) and cached under a
key of (onnx sha256, GPU name, TensorRT version, precision, max batch), in
BUNDLE/engines/ unless the config names another folder. It has one
optimization profile for a dynamic batch of 1..max_batch.

`build_engine` builds into the same cache ahead of time (`trainer
build-engine`, which also brings an int8 calibrator); the daemon then loads
the engine instead of building it.

`tensorrt` and `torch` are imported only here and in streamd.backends.tensorrt,
only when a TensorRT engine is built or run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from functools import cache
from pathlib import Path

from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10,)


def engine_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> str:
    """The cache file stem of an engine: readable parts plus a hash of the whole key."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    digest = hashlib.sha256(f"{onnx_sha256}|{gpu_name}|{trt_version}|{precision}|{max_batch}".encode()).hexdigest()
    return f"{onnx_sha256[:12]}-{gpu}-trt{trt_version}-{precision}-b{max_batch}-{digest[:8]}"


def import_tensorrt():
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


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendError("backend tensorrt: torch (the CUDA runtime streamd uses with TensorRT) is not installed") from exc
    if not torch.cuda.is_available():
        raise BackendError("backend tensorrt: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return torch


@cache
def trt_logger(trt):
    """One TensorRT logger per process: TensorRT warns when builders and runtimes get different ones."""
    return trt.Logger(trt.Logger.WARNING)


def cuda_device_name(torch, device: int) -> str:
    try:
        torch.cuda.set_device(device)
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError) as exc:
        raise BackendError(f"backend tensorrt: CUDA device {device} is not usable: {exc}") from exc


def engine_path(bundle: Bundle, gpu_name: str, trt_version: str, precision: str, max_batch: int, cache_dir: Path | None = None) -> Path:
    """Where the engine of this key lives: CACHE_DIR (default BUNDLE/engines) / KEY.engine."""
    return (cache_dir or bundle.path / "engines") / f"{engine_key(bundle.sha256, gpu_name, trt_version, precision, max_batch)}.engine"


def serialize_engine(trt, bundle: Bundle, precision: str, max_batch: int, workspace_mb: int, calibrator=None) -> bytes:
    """Parse model.onnx and build a serialized engine with one profile for batch 1..max_batch."""
    logger = trt_logger(trt)
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


def write_cache(path: Path, data: bytes, key: dict) -> None:
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
    trt, torch = import_tensorrt(), import_torch()
    gpu_name = cuda_device_name(torch, device)
    path = engine_path(bundle, gpu_name, trt.__version__, precision, max_batch, engine_cache_dir)
    if path.is_file():
        log.info("TensorRT engine already cached: %s", path)
        return path
    log.info("building a TensorRT %s engine for %s on %s (minutes)", precision, bundle.onnx_path, gpu_name)
    data = serialize_engine(trt, bundle, precision, max_batch, workspace_mb, calibrator)
    try:
        write_cache(path, data, key_note(bundle, gpu_name, trt.__version__, precision, max_batch))
    except OSError as exc:
        raise BackendError(f"cannot write the TensorRT engine to {path}: {exc}") from exc
    return path


def key_note(bundle: Bundle, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> dict:
    return {"onnx_sha256": bundle.sha256, "gpu_name": gpu_name, "tensorrt_version": trt_version,
            "precision": precision, "max_batch": max_batch}  # fmt: skip
