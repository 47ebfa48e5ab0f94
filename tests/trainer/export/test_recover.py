"""trainer.export.recover: a YOLOX state_dict recovered from an exported model.onnx computes what the graph computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from streamd.model import load_bundle
from trainer.export.onnx import export_onnx
from trainer.export.recover import MAX_ABS_DIFF, check_recovery, module_name, recover_state_dict

from .test_weights import INPUT_HW, experiment, untrained

REPO = Path(__file__).parents[3]
SHIPPED = REPO / "models" / "bccd-nano.bundle"


@pytest.mark.parametrize(
    "conv_output, module",
    [
        ("/backbone/backbone/stem/conv/conv/Conv_output_0", "backbone.backbone.stem.conv.conv"),
        ("/backbone/backbone/dark2/dark2.0/dconv/conv/Conv_output_0", "backbone.backbone.dark2.0.dconv.conv"),
        ("/backbone/backbone/dark3/dark3.1/m/m.2/conv2/pconv/conv/Conv_output_0", "backbone.backbone.dark3.1.m.2.conv2.pconv.conv"),
        ("/head/cls_convs.0/cls_convs.0.1/dconv/conv/Conv_output_0", "head.cls_convs.0.1.dconv.conv"),
        ("/head/cls_preds.2/Conv_output_0", "head.cls_preds.2"),
        ("/backbone/C3_p4/m/m.0/conv1/conv/Conv_output_0", "backbone.C3_p4.m.0.conv1.conv"),
    ],
)
def test_module_name_from_the_conv_scope(conv_output, module):
    assert module_name(conv_output) == module


@pytest.fixture(scope="module")
def onnx_of_untrained(tmp_path_factory):
    """A nano with random batch-norm statistics, exported (BN folded, simplified) as trainer export does it."""
    exp = experiment()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(export_onnx(untrained(exp, seed=3), INPUT_HW))
    return exp, path


def test_recovered_weights_compute_what_the_graph_computes(onnx_of_untrained):
    exp, path = onnx_of_untrained
    state = recover_state_dict(path, "yolox_nano", len(exp.classes))
    batch = np.random.default_rng(2).uniform(0, 255, (3, 3, *INPUT_HW)).astype(np.float32)
    scores, boxes = check_recovery(path, state, "yolox_nano", len(exp.classes), batch)
    assert scores <= MAX_ABS_DIFF and boxes <= MAX_ABS_DIFF
    # and the check itself sees a wrong weight
    state["head.cls_preds.0.bias"] = state["head.cls_preds.0.bias"] + 0.1
    scores, _ = check_recovery(path, state, "yolox_nano", len(exp.classes), batch)
    assert scores > 1e-3


@pytest.mark.parametrize(
    "architecture, classes, message",
    [("yolox_tiny", 2, "not those of a yolox_tiny"), ("yolox_nano", 3, "does not fit module head.cls_preds.0")],
)
def test_recovery_refuses_another_architecture(onnx_of_untrained, architecture, classes, message):
    _, path = onnx_of_untrained
    with pytest.raises(ValueError, match=message):
        recover_state_dict(path, architecture, classes)


def test_shipped_bundle_weights_are_the_recovery_of_its_onnx():
    bundle = load_bundle(SHIPPED)  # both sha256s checked
    shipped = load_file(bundle.weights_path)
    recovered = recover_state_dict(bundle.onnx_path, bundle.meta.architecture, len(bundle.class_names))
    assert shipped.keys() == recovered.keys()
    for name, tensor in recovered.items():
        assert torch.equal(shipped[name], tensor), name
