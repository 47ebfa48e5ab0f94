"""Building and caching TensorRT engines for streamd's TensorRT backend (and `trainer build-engine`).

The engine is built from the bundle's `model.onnx` on the machine that runs
it (an engine is tied to its GPU and TensorRT version) and cached under a
key of (onnx sha256, GPU name, TensorRT version, precision, max batch), in
BUNDLE/engines/ unless the config names another folder. It has one
optimization profile for a dynamic batch of 1..max_batch.

`build_engine` builds into the same cache ahead of time (`trainer
build-engine`, which also brings an int8 calibrator); the daemon then loads
the engine instead of building it.

Precisions: fp32 is fp32 (TensorRT's default TF32 for convolutions and
matrix products is cleared); fp16 allows fp16 and TF32 kernels; int8 allows
int8 where scales are known, else fp16. With fp16 or int8, YOLOX's decode
inside the graph (the grid add, exp * stride, the final concat) is held in
fp32 (`keep_decode_fp32`): in fp16 a centre near 640 px is quantised to
0.5 px and exp(wh) * 32 overflows above wh ~ 7.6. The int8 scales come either from a
calibrator (implicit quantization, TensorRT 10 only) or from the model's own
Q/DQ nodes (explicit quantization: `trainer quantize --for tensorrt`), which
must be symmetric int8 (zero point 0): checked in the ONNX file before
TensorRT parses it.

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
from typing import Protocol

from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10,)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
PRECISION_NOTES = {
    "fp32": "fp32 kernels only: TF32 cleared",
    "fp16": "fp16 kernels where faster, TF32 allowed",
    "int8": "int8 kernels where scales are known, else fp16",
}


class Int8Calibrator(Protocol):
    """The trainer's calibrator: a tensorrt.IInt8Calibrator that keeps what went wrong in get_batch.

    TensorRT's Python bindings swallow an exception raised in get_batch and end
    the calibration as if the data had run out; the calibrator keeps it in
    `error` instead, and serialize_engine raises it after the build.
    """

    error: BaseException | None

    def get_batch_size(self) -> int: ...


# How serialize_engine builds, in the key: a change that makes another engine of the same inputs (2: fp32 with TF32
# cleared, int8 calibrated through its own profile; 3: the in-graph decode held in fp32) must not find the engines
# cached before it.
BUILD_RECIPE = 3
# The layers YOLOX's in-graph decode is made of (its Add/Mul/Exp, Slice, Concat, Reshape/Transpose and their
# constants), walked back from the network's output; the walk stops at the head's last convolutions and sigmoids.
# Of those, the ones that compute or gather values are held in fp32: the grid add, exp, the stride multiplies and
# the concats (data movement with shape-tensor inputs, such as Slice and Reshape, is left to TensorRT).
DECODE_LAYER_TYPES = ("ELEMENTWISE", "UNARY", "CONCATENATION", "SLICE", "SHUFFLE", "CONSTANT", "CAST", "IDENTITY")
HELD_LAYER_TYPES = ("ELEMENTWISE", "UNARY", "CONCATENATION")


def engine_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> str:
    """The cache file stem of an engine: readable parts plus a hash of the whole key (the build recipe included)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    key = f"{onnx_sha256}|{gpu_name}|{trt_version}|{precision}|{max_batch}|recipe{BUILD_RECIPE}"
    digest = hashlib.sha256(key.encode()).hexdigest()
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


def serialize_engine(trt, bundle: Bundle, precision: str, max_batch: int, workspace_mb: int, calibrator: Int8Calibrator | None = None) -> bytes:
    """Parse model.onnx and build a serialized engine with one profile for batch 1..max_batch.

    precision fp32 clears BuilderFlag.TF32 (on by default in TensorRT), so an
    fp32 engine computes in fp32. For int8, the scales come from `calibrator`
    (calibrated at its own batch size through a calibration profile of that
    fixed shape) or from the model's Q/DQ nodes, never both. Raises
    BackendError naming the ONNX file when it does not parse or build, when
    its Q/DQ nodes are not symmetric int8, and when the calibration failed.
    """
    # Before TensorRT parses: its error would not say why. A Q/DQ model builds only as int8 (TensorRT 10 wants the
    # INT8 flag for it); for fp16/fp32 the check runs where the onnx package is there to run it.
    has_qdq = check_qdq(bundle.onnx_path, required=precision == "int8")
    if has_qdq and precision != "int8":
        raise BackendError(
            f"{bundle.onnx_path}: the model carries int8 Q/DQ nodes, which TensorRT builds as int8 only: set "
            f"backend.precision: int8 (or trainer build-engine --precision int8), not {precision}"
        )
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{bundle.onnx_path}: TensorRT cannot parse the model: {problems}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds conv/matmul inputs to 10 mantissa bits
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without int8 kernels fall back to fp16
        held = keep_decode_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)  # PREFER would let TensorRT pick fp16 anyway
        log.info("TensorRT build of %s: %d layers of the in-graph decode held in fp32", bundle.onnx_path, len(held))
    if precision == "int8":
        if calibrator is None and not has_qdq:
            raise BackendError(
                f"{bundle.onnx_path}: precision int8 needs calibration scales: build the engine with "
                "`trainer build-engine BUNDLE --precision int8 --data EXPERIMENT.yaml` (streamd then loads it "
                "from the cache), use an int8 bundle made by `trainer quantize --for tensorrt`, or use fp16"
            )
        if calibrator is not None and has_qdq:
            raise BackendError(
                f"{bundle.onnx_path}: the model already carries its int8 scales (Q/DQ nodes); "
                "build it without calibration data"
            )
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            config.int8_calibrator = calibrator
    height, width = bundle.meta.input_hw
    input_name = bundle.meta.onnx.input_name
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, 3, height, width), (max_batch, 3, height, width), (max_batch, 3, height, width))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        # TensorRT calibrates at the calibration profile's opt shape and reads that many images from each
        # batch the calibrator hands over: the shape must be the calibrator's own batch, whatever max_batch is.
        shape = (calibrator.get_batch_size(), 3, height, width)
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(input_name, shape, shape, shape)
        if not config.set_calibration_profile(calibration_profile):  # else TensorRT calibrates at max_batch's opt
            raise BackendError(f"{bundle.onnx_path}: TensorRT refused the calibration profile of batch {shape[0]}")
    log.info("TensorRT build of %s: %s (%s), batch 1..%d", bundle.onnx_path, precision, PRECISION_NOTES[precision], max_batch)
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        raise BackendError(f"{bundle.onnx_path}: int8 calibration failed, no engine kept: {calibrator.error}") from calibrator.error
    if serialized is None:
        raise BackendError(f"{bundle.onnx_path}: TensorRT could not build an engine (build_serialized_network returned None; see its log above)")
    return bytes(serialized)


def keep_decode_fp32(trt, network) -> list[str]:
    """Hold the in-graph decode in fp32: the names of the layers given precision and output types float32.

    The decode is every layer of DECODE_LAYER_TYPES reached walking back from the network's outputs (through all
    their inputs); those of HELD_LAYER_TYPES with a float32 output (not the shape arithmetic in int32/int64) are
    constrained. The constraints bind only with BuilderFlag.OBEY_PRECISION_CONSTRAINTS, which the caller sets.
    """
    decode_types = {getattr(trt.LayerType, name) for name in DECODE_LAYER_TYPES}
    held_types = {getattr(trt.LayerType, name) for name in HELD_LAYER_TYPES}
    producer = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for output in range(layer.num_outputs):
            producer[layer.get_output(output).name] = layer
    pending = [network.get_output(index).name for index in range(network.num_outputs)]
    seen: set[str] = set()
    held = []
    while pending:
        layer = producer.get(pending.pop())
        if layer is None or layer.name in seen or layer.type not in decode_types:
            continue
        seen.add(layer.name)
        pending.extend(tensor.name for tensor in map(layer.get_input, range(layer.num_inputs)) if tensor is not None)
        floats = [index for index in range(layer.num_outputs) if layer.get_output(index).dtype == trt.float32]
        if floats and layer.type in held_types:
            layer.precision = trt.float32
            for index in floats:
                layer.set_output_type(index, trt.float32)
            held.append(layer.name)
    return held


def check_qdq(onnx_path: Path, required: bool = True) -> bool:
    """True when the ONNX model has Q/DQ nodes, all of them symmetric int8 as this backend builds them.

    TensorRT builds QuantizeLinear/DequantizeLinear with an int8 zero point of
    0 only; ONNX Runtime's default quantization (uint8 activations, zero
    points != 0) is refused here, naming the nodes, before TensorRT parses it.
    Needs the onnx package (pip install onnx, in the gpu extra); without it, False when not `required`.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        if not required:
            return False
        raise BackendError(f"{onnx_path}: checking an int8 model needs the onnx package (pip install onnx)") from exc
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise BackendError(f"{onnx_path}: not a readable ONNX model: {exc}") from exc
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    nodes = [node for node in model.graph.node if node.op_type in QDQ_OPS]
    problems: dict[str, list[str]] = {}  # what is wrong -> the nodes it is wrong with
    for node in nodes:
        if problem := _qdq_problem(onnx, node, constants):
            problems.setdefault(problem, []).append(f"{node.op_type} {node.name or node.output[0]}")
    if problems:
        found = "; ".join(f"{problem}: {len(names)} node(s), e.g. {names[0]}" for problem, names in problems.items())
        raise BackendError(
            f"{onnx_path}: streamd's TensorRT backend builds symmetric int8 Q/DQ only (zero point int8 0), and "
            f"{sum(map(len, problems.values()))} of {len(nodes)} Q/DQ nodes are not: {found}. "
            "Quantize the fp32 bundle with `trainer quantize FP32.bundle --for tensorrt`"
        )
    return bool(nodes)


def _qdq_problem(onnx, node, constants: dict) -> str | None:
    """Why TensorRT refuses this QuantizeLinear/DequantizeLinear node, or None."""
    int8 = onnx.TensorProto.INT8
    zero_name = node.input[2] if len(node.input) > 2 else ""
    if not zero_name:
        if node.op_type == "QuantizeLinear":
            output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            return None if output_dtype == int8 else "no zero point, so its output is uint8"
        source = constants.get(node.input[0])
        if source is not None and source.data_type != int8:
            return f"dequantizes {onnx.TensorProto.DataType.Name(source.data_type).lower()} {node.input[0]}"
        return None
    zero = constants.get(zero_name)
    if zero is None:
        return f"zero point {zero_name} is not a constant"
    if zero.data_type != int8:
        return f"zero point is {onnx.TensorProto.DataType.Name(zero.data_type).lower()}, not int8"
    values = onnx.numpy_helper.to_array(zero)
    if values.any():
        return "zero point is not 0"
    return None


def write_cache(path: Path, data: bytes, key: dict) -> None:
    """Write the engine, then the JSON note of its key beside it (KEY.json), each with write_atomic.

    The old note goes first: a new engine beside the note of an older one (the note's write failed) would pass
    for that one (its calibration key); an engine without a note is rebuilt.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    write_atomic(path, data)
    write_atomic(path.with_suffix(".json"), (json.dumps(key, indent=2) + "\n").encode())
    log.info("cached TensorRT engine %s", path)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` all at once and durably: a temp file beside it, fsynced, renamed, the folder fsynced.

    A reader sees the old file or the new one, never a part; after a crash the
    rename is on disk; on any failure the temp file is removed and the error raised.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # makes the rename itself durable
    finally:
        os.close(folder)


def build_engine(
    bundle: Bundle,
    *,
    precision: str = "fp16",
    max_batch: int = 8,
    device: int = 0,
    engine_cache_dir: Path | None = None,
    workspace_mb: int = 2048,
    calibrator: Int8Calibrator | None = None,
    calibration_key: str | None = None,
) -> Path:
    """Build the engine of `bundle` for this GPU into the cache the daemon reads (or find it there); its path.

    For `trainer build-engine`: ahead of time, and for int8 with the
    trainer's calibrator (an Int8Calibrator) unless the model has Q/DQ nodes.
    max_batch and engine_cache_dir must match the daemon's config, since both
    select the file. precision is fp32 (TF32 off), fp16 or int8.
    calibration_key (with a calibrator: a hash of the model and calibration
    images) is recorded in the key note; a cached engine calibrated under
    another key is rebuilt.
    """
    trt, torch = import_tensorrt(), import_torch()
    gpu_name = cuda_device_name(torch, device)
    path = engine_path(bundle, gpu_name, trt.__version__, precision, max_batch, engine_cache_dir)
    if path.is_file():
        cached_key = cached_calibration_key(path)
        if cached_key == calibration_key:
            log.info("TensorRT engine already cached: %s", path)
            return path
        log.info("cached engine %s was calibrated on other data (key %s, now %s); rebuilding it", path, cached_key, calibration_key)
    log.info("building a TensorRT %s engine for %s on %s (minutes)", precision, bundle.onnx_path, gpu_name)
    data = serialize_engine(trt, bundle, precision, max_batch, workspace_mb, calibrator)
    note = key_note(bundle, gpu_name, trt.__version__, precision, max_batch)
    if calibration_key is not None:
        note["calibration_key"] = calibration_key
    try:
        write_cache(path, data, note)
    except OSError as exc:
        raise BackendError(f"cannot write the TensorRT engine to {path}: {exc}") from exc
    return path


def cached_calibration_key(engine: Path) -> str | None:
    """The calibration_key in a cached engine's key note; None when it has none (or no readable note)."""
    try:
        return json.loads(engine.with_suffix(".json").read_text()).get("calibration_key")
    except (OSError, ValueError, AttributeError):
        return None


def key_note(bundle: Bundle, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> dict:
    return {"onnx_sha256": bundle.sha256, "gpu_name": gpu_name, "tensorrt_version": trt_version,
            "precision": precision, "max_batch": max_batch}  # fmt: skip
