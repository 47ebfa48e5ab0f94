"""The model I/O contract pinned against YOLOX itself: letterbox, decode + NMS, bundle checks."""

import json

import numpy as np
import pytest
import torch
from yolox.data.data_augment import preproc as yolox_preproc
from yolox.utils.boxes import postprocess as yolox_postprocess

from streamd.errors import BundleError
from streamd.messages import detection_records
from streamd.model import Detections, letterbox, load_bundle, nms, postprocess, write_bundle
from streamd.model.bundle import Preprocess


@pytest.mark.parametrize("source_hw, input_hw", [((480, 640), (416, 416)), ((720, 1280), (640, 640)), ((100, 50), (64, 96)), ((416, 416), (416, 416))])
def test_letterbox_equals_yolox_preproc(source_hw, input_hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*source_hw, 3), dtype=np.uint8)
    expected, expected_scale = yolox_preproc(image, input_hw)
    boxed = letterbox(image, input_hw)
    assert boxed.scale == pytest.approx(expected_scale)
    np.testing.assert_array_equal(boxed.tensor, expected)


@pytest.mark.parametrize("source_hw", [(4, 1920), (2, 4096), (2048, 2), (0, 16)])
def test_letterbox_refuses_images_with_a_0_pixel_side(source_hw):
    """cv2.resize would assert (inv_scale_x > 0); letterbox says which size cannot fit, as a ValueError."""
    image = np.zeros((*source_hw, 3), np.uint8)
    height, width = source_hw
    with pytest.raises(ValueError, match=f"a {width}x{height} image"):
        letterbox(image, (416, 416))


def test_letterbox_rgb_and_normalisation():
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 10  # blue
    boxed = letterbox(image, (32, 32), Preprocess(channel_order="rgb", mean=(1.0, 1.0, 1.0), std=(2.0, 2.0, 2.0)))
    assert boxed.tensor[2, 0, 0] == pytest.approx((10 - 1) / 2)  # blue went last
    assert boxed.tensor[0, 0, 0] == pytest.approx(-0.5)


def _random_output(rng, n, anchors, classes, size=416):
    out = np.zeros((n, anchors, 5 + classes), np.float32)
    out[..., 0:2] = rng.uniform(0, size, (n, anchors, 2))
    out[..., 2:4] = rng.uniform(4, 80, (n, anchors, 2))
    out[..., 4] = rng.uniform(0, 1, (n, anchors))
    out[..., 5:] = rng.uniform(0, 1, (n, anchors, classes))
    return out


@pytest.mark.parametrize("seed, conf_threshold, iou_threshold", [(0, 0.3, 0.45), (1, 0.1, 0.65), (2, 0.5, 0.3)])
def test_postprocess_equals_yolox(seed, conf_threshold, iou_threshold):
    rng = np.random.default_rng(seed)
    output = _random_output(rng, 2, 300, 3)
    ours = postprocess(output, np.ones(2, np.float32), [(416, 416)] * 2, conf_threshold, iou_threshold)
    theirs = yolox_postprocess(torch.from_numpy(output.copy()), 3, conf_threshold, iou_threshold)
    for mine, ref in zip(ours, theirs):
        ref = ref.numpy()
        order = np.argsort(-(ref[:, 4] * ref[:, 5]), kind="stable")
        ref = ref[order]
        np.testing.assert_allclose(mine.xyxy, np.clip(ref[:, :4], 0, 416), atol=1e-4)
        np.testing.assert_allclose(mine.confidence, ref[:, 4] * ref[:, 5], rtol=1e-5)
        np.testing.assert_array_equal(mine.class_id, ref[:, 6].astype(np.int64))


def test_postprocess_maps_boxes_to_source_pixels():
    output = np.zeros((1, 1, 6), np.float32)
    output[0, 0] = [100, 50, 40, 20, 0.9, 1.0]  # cx, cy, w, h in the 416 input
    (det,) = postprocess(output, np.array([416 / 640], np.float32), [(480, 640)], 0.3, 0.45)
    np.testing.assert_allclose(det.xyxy[0], np.array([80, 40, 120, 60]) * 640 / 416, rtol=1e-5)


@pytest.mark.parametrize(
    "boxes, scores, classes, expected",
    [
        ([[0, 0, 10, 10], [1, 1, 10, 10]], [0.9, 0.8], [0, 0], [0]),  # overlap, same class: one kept
        ([[0, 0, 10, 10], [1, 1, 10, 10]], [0.9, 0.8], [0, 1], [0, 1]),  # different classes never suppress
        ([[0, 0, 10, 10], [20, 20, 30, 30]], [0.5, 0.8], [0, 0], [1, 0]),  # disjoint: both, by score
        ([], [], [], []),
    ],
)
def test_nms_table(boxes, scores, classes, expected):
    keep = nms(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(classes), 0.5)
    assert keep.tolist() == expected


def test_detections_validate_and_mask():
    det = Detections([[0, 0, 1, 1], [1, 1, 2, 2]], [0.5, 0.9], [0, 1])
    assert len(det[det.confidence > 0.6]) == 1
    assert not det.xyxy.flags.writeable
    with pytest.raises(ValueError, match="differ in length"):
        Detections([[0, 0, 1, 1]], [0.5, 0.9], [0])
    assert detection_records(det, ("a", "b"))[1] == {
        "label": "b", "class_id": 1, "score": 0.9, "box": [1.0, 1.0, 2.0, 2.0], "track_id": None, "confirmed": True}
    tracked = det.with_tracks(np.array([4, -1]), np.array([True, False]))
    assert [(r["track_id"], r["confirmed"]) for r in detection_records(tracked, ("a", "b"))] == [(4, True), (None, False)]
    assert tracked[tracked.confidence > 0.6].track_id.tolist() == [-1]  # a mask keeps every column
    with pytest.raises(ValueError, match="differ in length"):
        det.with_tracks(np.array([1]), np.array([True, True]))


def _meta():
    return {
        "name": "t", "architecture": "yolox_nano", "class_names": ["a"], "input_hw": [64, 64],
        "onnx": {"opset": 17},
        "provenance": {"dataset": "d", "dataset_hash": "h", "epochs": 1, "trainer_version": "0", "created_at": "now"},
    }


def test_bundle_round_trip_and_checksum(tmp_path):
    bundle = write_bundle(tmp_path / "t.bundle", b"not really onnx", _meta())
    assert load_bundle(bundle.path).sha256 == bundle.sha256
    (bundle.path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle.path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(input_hw=[65, 64]), "input_hw"),
        (lambda m: m.update(architecture="yolov8"), "architecture"),
        (lambda m: m.update(extra_field=1), "extra_field"),
        (lambda m: m.pop("class_names"), "class_names"),
    ],
)
def test_bundle_errors_name_the_field(tmp_path, change, message):
    bundle = write_bundle(tmp_path / "t.bundle", b"x", _meta())
    meta = json.loads((bundle.path / "bundle.json").read_text())
    change(meta)
    (bundle.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle.path)


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nope.bundle")
