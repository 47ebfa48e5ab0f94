"""fp32 bundle -> int8 bundle: ONNX Runtime static quantization, calibrated on the training split.

`quantize_bundle(BUNDLE, EXPERIMENT.yaml, OUT)` quantizes the bundle's
`model.onnx` with `onnxruntime.quantization.quantize_static` and writes a
bundle like any other (streamd.model.bundle.write_bundle: its own sha256; the
class names, input size, preprocess and thresholds of the source). The
calibration images are the first `calibration_images` of the experiment's
train split, letterboxed by the bundle's own preprocess
(trainer.export.calibration, the reader the TensorRT int8 calibrator uses
too).

Two targets (`target`, `trainer quantize --for`):

- `onnxruntime` (default): uint8 activations (asymmetric: zero points != 0),
  int8 weights, as ONNX Runtime's CPU kernels run fastest.
- `tensorrt`: TensorRT's explicit quantization accepts symmetric int8 Q/DQ
  only: int8 activations and weights, every zero point 0, biases left float
  (TensorRT has no int32 DequantizeLinear). `trainer build-engine --precision
  int8` builds it without a calibrator, and ONNX Runtime still runs it.

What is quantized, and why (measured on BCCD with the shipped nano bundle;
the table is in docs/trainer.md):

- Q/DQ format, int8 weights **per channel**, MinMax calibration. ONNX Runtime fuses the Q/DQ pairs into QLinearConv,
  QLinearSigmoid and QLinearMul (YOLOX's SiLU stays int8, so the tensors
  between convolutions never go back to float). Per-channel weights keep
  AP50 within 0.002 of fp32 where per-tensor loses 0.007.
- The **decode tail** stays float: every node from the graph's output back to
  the last convolutions (the head's sigmoids, reshapes, grid offsets, `Exp`,
  stride scaling). Boxes in pixels and scores near 0 do not survive one
  8-bit scale (AP50 0.50 when it is quantized).
- The **input stem** stays float: the nodes between the input and the first
  convolution (YOLOX's Focus: four strided Slices and a Concat). Left float,
  ONNX Runtime fuses them into one SpaceToDepth; quantized, they run as four
  slow uint8 Slices.
- For TensorRT, also the **first convolution** (its input is the image,
  0..255: a symmetric int8 scale halves its resolution) and the **depthwise
  convolutions** (one per-tensor symmetric activation scale fits their
  channels badly). With either quantized, confident BCCD boxes were lost
  (2 of about 30 on 6 images); with both float, none on 8, 12 or 16
  calibration images. TensorRT runs them in fp16.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from streamd.model import load_bundle
from streamd.model.bundle import Bundle, write_bundle
from trainer import __version__
from trainer.config import load_experiment
from trainer.export.bundle import add_golden_frames, check_out
from trainer.export.calibration import calibration_set

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8
# quantize_static's settings per target runtime. TensorRT's explicit quantization: symmetric int8 (zero point
# 0) activations and weights, no int32 bias DequantizeLinear (TensorRT dequantizes int8 only and fuses the
# float bias into the convolution), and Q/DQ on the convolutions' inputs only, where TensorRT wants them: it
# fuses SiLU and the rest into the int8 convolutions by itself.
TARGET_SETTINGS = {
    "onnxruntime": {"activation_type": QuantType.QUInt8, "calibrate_method": CalibrationMethod.MinMax},
    "tensorrt": {
        "activation_type": QuantType.QInt8,
        "op_types_to_quantize": ["Conv"],
        "calibrate_method": CalibrationMethod.MinMax,
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    },
}
TARGETS = tuple(TARGET_SETTINGS)
# Node types that mark a model as already quantized: quantizing it again would stack scales.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"})
# What `trainer eval --compare` puts side by side (EvalReport fields).
COMPARED_METRICS = ("coco_ap50", "coco_ap", "coco_ap75", "voc_map50", "voc_map50_95")


@dataclass(frozen=True)
class QuantizeResult:
    bundle: str
    sha256: str
    source_bundle: str
    source_sha256: str
    calibration_dataset: str
    calibration_split: str
    calibration_images: int
    target: str
    float_nodes: int  # nodes left in float: the decode tail and the input stem
    onnx_bytes: int
    seconds: float


class _Reader(CalibrationDataReader):
    """ONNX Runtime's calibration interface over CalibrationSet.batches: one {input_name: [B, 3, H, W]} feed per batch."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str):
        self._feeds: Iterator[dict[str, np.ndarray]] = ({input_name: batch} for batch in batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.images += len(next(iter(feed.values())))
        return feed


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes from the graph's outputs back to (not including) the last convolutions.

    In a YOLOX export that is the in-graph decode: the head's sigmoids,
    concatenations and reshapes, the grid offsets, Exp and the stride scaling.
    """
    producer = {output: node for node in model.graph.node for output in node.output}
    names: list[str] = []
    seen: set[str] = set()
    pending = [output.name for output in model.graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.op_type == "Conv" or node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        pending.extend(node.input)
    return names


def input_stem(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the graph's inputs and the first convolutions (YOLOX's Focus slices and concat)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names: list[str] = []
    seen: set[str] = set()
    pending = [graph_input.name for graph_input in model.graph.input]
    while pending:
        for node in consumers.get(pending.pop(), ()):
            if node.op_type == "Conv" or node.name in seen:
                continue
            seen.add(node.name)
            names.append(node.name)
            pending.extend(node.output)
    return names


def first_convolutions(model: onnx.ModelProto) -> list[str]:
    """Names of the convolutions that read the input stem's output (YOLOX's stem conv): the image, 0..255."""
    stem = set(input_stem(model))
    stem_outputs = {output for node in model.graph.node if node.name in stem for output in node.output}
    stem_outputs |= {graph_input.name for graph_input in model.graph.input}
    return [node.name for node in model.graph.node if node.op_type == "Conv" and stem_outputs & set(node.input)]


def depthwise_convolutions(model: onnx.ModelProto) -> list[str]:
    """Names of the grouped (depthwise) convolutions: YOLOX nano and tiny's DWConv."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Conv" and any(attribute.name == "group" and attribute.i > 1 for attribute in node.attribute)
    ]


def quantize_bundle(
    source: Path,
    experiment_file: Path,
    out: Path,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    name: str | None = None,
    target: str = "onnxruntime",
    overwrite: bool = False,
) -> QuantizeResult:
    """Write `out`, the int8 bundle of the fp32 bundle `source`, calibrated on experiment_file's train split.

    target: "onnxruntime" (uint8 activations) or "tensorrt" (symmetric int8,
    zero points 0, float biases: what TensorRT builds; ONNX Runtime runs it too).

    Raises streamd.errors.BundleError when `source` is not a valid bundle,
    streamd.errors.ConfigError for an invalid experiment, and ValueError,
    naming the file, when the experiment's classes differ from the bundle's,
    its train split has no image, the source is already quantized, `out`
    is the source, or `out` holds files and not overwrite (export's check_out).
    The int8 bundle gets golden frames like an exported one: the first images
    of the experiment's val split and ONNX Runtime's detections on them with
    the int8 model, the reference a TensorRT int8 engine is compared with.
    """
    if target not in TARGETS:
        raise ValueError(f"quantize target must be one of {', '.join(TARGETS)}, got {target!r}")
    started = time.time()
    bundle = load_bundle(source)
    if Path(out).resolve() == bundle.path.resolve():
        raise ValueError(f"{out}: is the source bundle; write the int8 bundle to another folder")
    check_out(out, overwrite)
    model = onnx.load(str(bundle.onnx_path))
    already = sorted({node.op_type for node in model.graph.node} & QUANTIZED_OPS)
    if already:
        raise ValueError(f"{bundle.onnx_path}: already quantized ({', '.join(already)} nodes); quantize the fp32 bundle")
    experiment = load_experiment(experiment_file)
    calibration = calibration_set(experiment, bundle, calibration_images, experiment_file)
    float_nodes = decode_tail(model) + input_stem(model)
    if target == "tensorrt":
        float_nodes += first_convolutions(model) + depthwise_convolutions(model)
    batches = calibration.batches(CALIBRATION_BATCH)
    first = next(batches, None)  # ONNX Runtime's own error for an empty feed would not name the data
    if first is None:
        raise ValueError(f"{experiment_file}: none of the {len(calibration.paths)} calibration images could be read")
    reader = _Reader(itertools.chain([first], batches), bundle.meta.onnx.input_name)
    with tempfile.TemporaryDirectory(prefix="trainer-quantize-") as tmp:
        quantized_path = Path(tmp) / "model.int8.onnx"
        quantize_static(
            str(bundle.onnx_path),
            str(quantized_path),
            reader,
            quant_format=QuantFormat.QDQ,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=float_nodes,
            **TARGET_SETTINGS[target],
        )
        onnx_bytes = quantized_path.read_bytes()
    log.info(
        "calibrated on %d images of %s/%s for %s; %d nodes left in float",
        reader.images, calibration.dataset, calibration.split, target, len(float_nodes),
    )
    calibration_fields = {
        "experiment": str(experiment_file), "dataset": calibration.dataset, "split": calibration.split,
        "images": reader.images, "fingerprint": calibration.fingerprint(), "method": "minmax", "target": target,
    }  # fmt: skip
    written = write_bundle(out, onnx_bytes, _int8_meta(bundle, calibration_fields, onnx_bytes, name))
    written = add_golden_frames(written.path, experiment) or written
    return QuantizeResult(
        bundle=str(written.path),
        sha256=written.sha256,
        source_bundle=str(bundle.path),
        source_sha256=bundle.sha256,
        calibration_dataset=calibration.dataset,
        calibration_split=calibration.split,
        calibration_images=reader.images,
        target=target,
        float_nodes=len(float_nodes),
        onnx_bytes=len(onnx_bytes),
        seconds=round(time.time() - started, 1),
    )


def _int8_meta(bundle: Bundle, calibration: dict, onnx_bytes: bytes, name: str | None) -> dict:
    """bundle.json fields of the int8 bundle: the source's contract, a new name and provenance, no metrics.

    The source's metrics describe the fp32 model, and its torch weights are
    not this model: both are left out. The provenance keeps the source's
    training fields and adds `source_bundle` and `calibration` (format 3);
    `checkpoint` says the same in words.
    """
    source = bundle.meta
    opset = next(entry.version for entry in onnx.load_from_string(onnx_bytes).opset_import if entry.domain in ("", "ai.onnx"))
    return {
        "name": name or f"{source.name}-int8",
        "architecture": source.architecture,
        "class_names": list(source.class_names),
        "input_hw": list(source.input_hw),
        "preprocess": source.preprocess.model_dump(mode="json"),
        "thresholds": source.thresholds.model_dump(mode="json"),
        "onnx": {"opset": opset, "input_name": source.onnx.input_name, "output_name": source.onnx.output_name},
        "provenance": {
            **source.provenance.model_dump(mode="json"),
            "trainer_version": __version__,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checkpoint": f"int8 ({calibration['target']}) of {bundle.path.name}",
            "source_bundle": {"name": bundle.path.name, "sha256": bundle.sha256},
            "calibration": calibration,
        },
    }


def metric_changes(report, reference) -> dict[str, dict[str, float]]:
    """{metric: {"model", "reference", "change"}} for COMPARED_METRICS of two EvalReports on the same split."""
    return {
        key: {
            "model": float(getattr(report, key)),
            "reference": float(getattr(reference, key)),
            "change": float(getattr(report, key)) - float(getattr(reference, key)),
        }
        for key in COMPARED_METRICS
    }


def print_changes(changes: dict[str, dict[str, float]], model: str, reference: str, console: Console | None = None) -> None:
    """The metric_changes table on the terminal, titled with both models' names."""
    table = Table(title=f"{model} against {reference}")
    for column in ("metric", "model", "reference", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, row in changes.items():
        table.add_row(key, f"{row['model']:.4f}", f"{row['reference']:.4f}", f"{row['change']:+.4f}")
    (console or Console()).print(table)


__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "QuantizeResult",
    "TARGETS",
    "decode_tail",
    "depthwise_convolutions",
    "first_convolutions",
    "input_stem",
    "metric_changes",
    "print_changes",
    "quantize_bundle",
]
