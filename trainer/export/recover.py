"""Recover a YOLOX state_dict from a bundle's model.onnx, for bundles exported before weights.safetensors.

`torch.onnx.export` in eval mode folds every BatchNorm into the convolution
before it (W' = W * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps)), and
onnxsim keeps each Conv node's name, which is the module scope it came from
(`/backbone/backbone/dark2/dark2.0/dconv/conv/Conv`). So every convolution of
a freshly built model of the same architecture is matched by name, checked
by shape, groups, stride, padding and dilation, and given the folded W' and
b': b' goes into its BatchNorm, which is set to the identity on the CPU's
float32 (weight 1, running_mean 0, running_var 1 - eps, so var + eps is
exactly 1.0). The head's predictors have no BatchNorm and keep their own
weight and bias. Nothing is approximated: the recovered model computes what
the ONNX graph computes, which `check_recovery` proves on real images before
anything is written.

    python -m trainer.export.recover models/bccd-nano.bundle configs/trainer/bccd-nano.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from streamd.errors import StreamdError
from streamd.model import letterbox_batch, load_bundle
from streamd.model.bundle import add_weights
from trainer.config import Experiment, load_experiment
from trainer.datasets import load_split
from trainer.export.weights import safetensors_bytes, yolox_fields
from trainer.yolox_adapter import build_model, inference_model

log = logging.getLogger(__name__)

CHECK_IMAGES = 16
MAX_ABS_DIFF = 1e-4  # objectness and class scores; boxes (pixels) are compared relative to their size


@dataclass(frozen=True)
class RecoverResult:
    bundle: str
    weights_sha256: str
    tensors: int
    images_checked: int
    max_abs_diff_scores: float
    max_rel_diff_boxes: float


def module_name(conv_output: str) -> str:
    """The torch module path of an exported Conv node, from its output's scope name.

    Sequential children carry their parent's scope as a prefix ("dark2", "dark2.0"), so a segment
    that extends the one before it adds only its suffix:
    /backbone/backbone/dark2/dark2.0/dconv/conv/Conv_output_0 -> backbone.backbone.dark2.0.dconv.conv
    """
    segments = [s for s in conv_output.split("/")[:-1] if s]
    parts: list[str] = []
    for previous, segment in zip([""] + segments, segments):
        parts.append(segment[len(previous) + 1 :] if previous and segment.startswith(previous + ".") else segment)
    return ".".join(parts)


def recover_state_dict(onnx_path: Path, architecture: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state_dict of a `architecture` YOLOX whose eval forward equals the ONNX graph's; ValueError if none fits."""
    graph = onnx.load(str(onnx_path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = {module_name(node.output[0]): node for node in graph.node if node.op_type == "Conv"}
    model = build_model(architecture, num_classes).eval()
    modules = dict(model.named_modules())
    torch_convs = [name for name, module in modules.items() if isinstance(module, torch.nn.Conv2d)]
    if sorted(convs) != sorted(torch_convs):
        missing, extra = sorted(set(torch_convs) - set(convs)), sorted(set(convs) - set(torch_convs))
        raise ValueError(
            f"{onnx_path}: its convolutions are not those of a {architecture} with {num_classes} classes "
            f"(not in the graph: {missing[:4]}; not in the model: {extra[:4]})"
        )
    with torch.no_grad():
        for name in torch_convs:
            conv, node = modules[name], convs[name]
            if len(node.input) < 3 or not all(i in initializers for i in node.input[1:3]):
                raise ValueError(f"{onnx_path}: Conv {node.name} has no constant weight and bias")
            weight, bias = (torch.from_numpy(initializers[i].copy()) for i in node.input[1:3])
            _check_conv(onnx_path, name, conv, node, weight)
            conv.weight.copy_(weight)
            parent = modules[name.rpartition(".")[0]]
            batch_norm = getattr(parent, "bn", None)
            if conv.bias is not None:
                conv.bias.copy_(bias)
            elif isinstance(batch_norm, torch.nn.BatchNorm2d):
                batch_norm.weight.fill_(1.0)
                batch_norm.bias.copy_(bias)
                batch_norm.running_mean.zero_()
                batch_norm.running_var.fill_(1.0 - batch_norm.eps)
            else:
                raise ValueError(f"{onnx_path}: {name} has neither a bias nor a BatchNorm to carry the folded bias")
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _check_conv(onnx_path: Path, name: str, conv: torch.nn.Conv2d, node: onnx.NodeProto, weight: torch.Tensor) -> None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    ours = {
        "shape": tuple(conv.weight.shape), "group": conv.groups, "strides": tuple(conv.stride),
        "pads": tuple(conv.padding) * 2, "dilations": tuple(conv.dilation),
    }  # fmt: skip
    theirs = {
        "shape": tuple(weight.shape), "group": attrs.get("group", 1), "strides": tuple(attrs.get("strides", (1, 1))),
        "pads": tuple(attrs.get("pads", (0, 0, 0, 0))), "dilations": tuple(attrs.get("dilations", (1, 1))),
    }  # fmt: skip
    if ours != theirs:
        raise ValueError(f"{onnx_path}: Conv {node.name} does not fit module {name}: graph {theirs}, model {ours}")


def check_recovery(
    onnx_path: Path, state: dict[str, torch.Tensor], architecture: str, num_classes: int, batch: np.ndarray
) -> tuple[float, float]:
    """Run the recovered model and ONNX Runtime on a float32 [N, 3, H, W] batch, one image at a time.

    Returns the largest absolute difference of the scores (objectness, classes) and the largest
    difference of the boxes relative to max(1, |box value|).
    """
    model = build_model(architecture, num_classes)
    model.load_state_dict(state)
    model = inference_model(model)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    score_diff = box_diff = 0.0
    with torch.inference_mode():
        for image in batch:
            ours = model(torch.from_numpy(image[None])).numpy()
            (theirs,) = session.run(None, {input_name: image[None]})
            score_diff = max(score_diff, float(np.abs(ours[..., 4:] - theirs[..., 4:]).max()))
            rel = np.abs(ours[..., :4] - theirs[..., :4]) / np.maximum(1.0, np.abs(theirs[..., :4]))
            box_diff = max(box_diff, float(rel.max()))
    return score_diff, box_diff


def recover_bundle(bundle_path: Path, exp: Experiment, check_images: int = CHECK_IMAGES) -> RecoverResult:
    """Add weights.safetensors recovered from model.onnx to a bundle, after proving them on the test split's images.

    model.onnx is not touched. ValueError when the experiment does not describe the bundle, or the
    recovered model differs from the ONNX graph by more than MAX_ABS_DIFF.
    """
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    if (meta.architecture, meta.class_names, tuple(meta.input_hw)) != (
        exp.model.architecture, exp.classes, tuple(exp.model.input_hw)
    ):
        raise ValueError(
            f"{bundle_path} is a {meta.architecture} {list(meta.input_hw)} for {list(meta.class_names)}; the experiment "
            f"describes a {exp.model.architecture} {list(exp.model.input_hw)} for {list(exp.classes)}"
        )
    state = recover_state_dict(bundle.onnx_path, meta.architecture, len(meta.class_names))
    records = load_split(exp, "test").records[:check_images]
    images = [cv2.imread(str(record.path), cv2.IMREAD_COLOR) for record in records]
    if not images or any(image is None for image in images):
        raise ValueError(f"cannot read the test images of {exp.dataset.root} to check the recovered weights")
    batch, _ = letterbox_batch(images, tuple(meta.input_hw), meta.preprocess)
    score_diff, box_diff = check_recovery(bundle.onnx_path, state, meta.architecture, len(meta.class_names), batch)
    log.info("recovered model vs ONNX Runtime on %d images: scores %.2e abs, boxes %.2e rel", len(images), score_diff, box_diff)
    if score_diff > MAX_ABS_DIFF or box_diff > MAX_ABS_DIFF:
        raise ValueError(
            f"{bundle.onnx_path}: the recovered weights differ from the graph (scores {score_diff:.2e}, boxes "
            f"{box_diff:.2e} relative; limit {MAX_ABS_DIFF:g}); the bundle was left as it was"
        )
    updated = add_weights(bundle.path, safetensors_bytes(state), yolox_fields(exp))
    if updated.sha256 != bundle.sha256:  # add_weights never writes model.onnx; this guards the contract
        raise ValueError(f"{bundle.onnx_path} changed while adding weights")
    return RecoverResult(str(updated.path), updated.meta.weights.sha256, len(state), len(images), score_diff, box_diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder (model.onnx is kept as it is)")
    parser.add_argument("experiment", type=Path, help="the experiment YAML it was trained from (architecture, classes, test split)")
    parser.add_argument("--images", type=int, default=CHECK_IMAGES, help="test images the recovery is checked on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = recover_bundle(args.bundle, load_experiment(args.experiment), args.images)
    except (ValueError, OSError, StreamdError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
