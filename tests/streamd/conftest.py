"""Fixtures for streamd's tests: a tiny real model bundle, small videos, config files.

The bundle's model.onnx is written by hand with onnx.helper: input images
float32 [N, 3, 64, 64] -> output float32 [N, 2, 5 + 3], fixed boxes whose
objectness follows the image's mean brightness, so ONNX Runtime (and
TensorRT) really run it and its detections are known in advance:

    anchor 0: cx 16, cy 16, w 16, h 16, objectness = mean/255, class 0 score 1.0
    anchor 1: cx 44, cy 40, w 20, h 24, objectness 0.9,        class 1 score 0.8
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from streamd.model import Bundle, write_bundle
from streamd.model.postprocess import yolox_anchors
from tests.streamd import media

INPUT_HW = (64, 64)
CLASS_NAMES = ("lesion", "landmark", "tool")
VIDEO_SIZE = (160, 120)  # width, height
VIDEO_FPS = 25


def tiny_onnx_bytes() -> bytes:
    """The model described in this module's docstring, serialised (opset 17)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    anchors, width = yolox_anchors(INPUT_HW), 5 + len(CLASS_NAMES)  # 84: a real head's count; all but 2 score 0
    base = np.zeros((1, anchors, width), np.float32)
    base[0, 0, :4] = [16, 16, 16, 16]
    base[0, 0, 5] = 1.0
    base[0, 1, :5] = [44, 40, 20, 24, 0.9]
    base[0, 1, 6] = 0.8
    weight = np.zeros((1, anchors, width), np.float32)
    weight[0, 0, 4] = 1 / 255
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape3"], ["mean"]),
        helper.make_node("Mul", ["mean", "weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "base"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_yolox",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *INPUT_HW])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", anchors, width])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(base, "base"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="streamd-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def bundle_meta(name: str = "tiny-test") -> dict:
    return {
        "name": name,
        "architecture": "yolox_nano",
        "class_names": list(CLASS_NAMES),
        "input_hw": list(INPUT_HW),
        "thresholds": {"conf_threshold": 0.3, "iou_threshold": 0.45},
        "onnx": {"opset": 17, "input_name": "images", "output_name": "output"},
        "provenance": {
            "dataset": "handmade", "dataset_hash": "0" * 64, "epochs": 0,
            "trainer_version": "tests", "created_at": "2026-01-01T00:00:00Z",
        },
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A real, loadable bundle of the hand-built model (shared: do not modify)."""
    return write_bundle(tmp_path_factory.mktemp("models") / "tiny.bundle", tiny_onnx_bytes(), bundle_meta())


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-frame 160x120 25 fps H.264 MP4 (testsrc2 + a moving box), shared: do not modify."""
    return media.make_video(
        tmp_path_factory.mktemp("clips") / "clip.mp4", size=VIDEO_SIZE, fps=VIDEO_FPS, frames=40, gop=10
    )


@pytest.fixture(scope="session")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 150-frame (6 s) clip for runs that are stopped part-way."""
    return media.make_video(
        tmp_path_factory.mktemp("clips") / "long.mp4", size=VIDEO_SIZE, fps=VIDEO_FPS, frames=150, gop=10
    )


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` for the test (needs root, as in CI; the test is skipped without it)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 192 KiB tmpfs: a recording fills it within a few seconds of video."""
    with tmpfs(tmp_path / "small-disk", "size=192k") as folder:
        yield folder


@pytest.fixture
def read_only(tmp_path: Path):
    """A read-only tmpfs: even root cannot write there."""
    with tmpfs(tmp_path / "read-only", "ro,size=64k") as folder:
        yield folder
