"""streamd.backends.device_ops on the CPU: yuv420p planes convert to swscale's bgr24 and the device letterbox to
OpenCV's, both bit for bit; the device path (letterbox -> torch model -> postprocess_on_device) gives ONNX Runtime's
detections (matched IoU >= 0.98, scores within 0.02) from bgr24 and from yuv420p frames; postprocess_on_device
equals streamd.model.postprocess."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from streamd.backends.device_ops import letterbox_frames, postprocess_on_device, resize_linear, yuv420p_to_bgr
from streamd.backends.select import make_backend
from streamd.backends.torch import load_model
from streamd.config import OnnxRuntimeConfig
from streamd.model import load_bundle
from streamd.model.bundle import Preprocess
from streamd.model.detections import Detections
from streamd.detector import Detector
from streamd.model.postprocess import box_iou, postprocess
from streamd.model.preprocess import letterbox
from streamd.types import PixelLayout

SHIPPED = Path(__file__).parents[3] / "models" / "bccd-nano.bundle"
# The bit-exact tests also run on CUDA where there is one (benchmarks/gpu_check.py runs the gpu-marked tests).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])]
INPUT_HW = (416, 416)
CONF, IOU = 0.3, 0.45
MIN_IOU, SCORE_TOLERANCE = 0.98, 0.02  # the parity bar


# --- real frames ---------------------------------------------------------------------------------


def _encode(path: Path, images_bgr: list[np.ndarray], pix_fmt: str = "yuv420p") -> Path:
    """Write the images as an H.264 video with PyAV: yuv420p (untagged: swscale reads it as BT.601 limited range)
    or yuvj420p (full range)."""
    height, width = images_bgr[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "18", "bf": "0"}
        for image in images_bgr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    return path


def _decode(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each frame decoded both ways with PyAV: (yuv420p planes [H * 3 / 2, W], bgr24 [H, W, 3])."""
    with av.open(str(path)) as container:
        return [(f.to_ndarray(format="yuv420p"), f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]


def _testsrc2(width: int, height: int, count: int) -> list[np.ndarray]:
    with av.open(f"testsrc2=size={width}x{height}:rate=5", format="lavfi") as source:
        frames = []
        for frame in source.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            if len(frames) == count:
                return frames
    raise RuntimeError("testsrc2 ended early")


@pytest.fixture(scope="module")
def bccd_images(bccd_root) -> list[np.ndarray]:
    """12 BCCD test images (640x480 BGR), every 4th resized to 1280x960 and every 4th to 320x200 (the tests' mix)."""
    names = (bccd_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:12]
    images = [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]
    return [cv2.resize(image, {1: (320, 200), 3: (1280, 960)}[i % 4]) if i % 2 else image for i, image in enumerate(images)]


@pytest.fixture(scope="module")
def decoded(bccd_images, tmp_path_factory) -> dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]]:
    """Real H.264 frames at the tests' sizes (W, H), decoded as yuv420p planes and as bgr24.

    640x480: testsrc2 (saturated colours, sharp edges), then BCCD images as a slideshow; 1280x960, 320x200: BCCD.
    """
    folder = tmp_path_factory.mktemp("yuv")
    by_size: dict[tuple[int, int], list[np.ndarray]] = {(640, 480): _testsrc2(640, 480, 3)}
    for image in bccd_images:
        by_size.setdefault((image.shape[1], image.shape[0]), []).append(image)
    return {size: _decode(_encode(folder / f"{size[0]}x{size[1]}.mp4", images)) for size, images in by_size.items()}


@pytest.fixture(scope="module")
def decoded_full_range(bccd_images, tmp_path_factory) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four 640x480 BCCD images as full-range (yuvj420p) H.264, decoded as their planes (as they are) and bgr24."""
    path = _encode(tmp_path_factory.mktemp("yuvj") / "full.mp4", bccd_images[0:8:2], "yuvj420p")
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).color_range == 2  # JPEG: full range
    return _decode(path)


# --- colour conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_yuv420p_to_bgr_is_swscales_bgr24_bit_for_bit(decoded, device):
    for size, frames in decoded.items():
        ours = yuv420p_to_bgr(torch.stack([torch.from_numpy(planes) for planes, _ in frames]).to(device)).cpu().numpy()
        assert ours.shape == (len(frames), size[1], size[0], 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, np.stack([bgr for _, bgr in frames]))


@pytest.mark.parametrize(
    "tag, colorspace, full_range",
    [(2, "bt601", False), (5, "bt601", False), (6, "bt601", False), (1, "bt709", False), (9, "bt2020", False),
     (2, "bt601", True), (1, "bt709", True), (9, "bt2020", True)],
)  # fmt: skip
def test_yuv420p_to_bgr_follows_the_colorspace_and_range_the_frame_is_tagged_with(decoded, tag, colorspace, full_range):
    """PyAV's VideoFrame.colorspace (AVColorSpace: 2 unspecified, 5 BT.470BG, 6 SMPTE 170M, 1 BT.709, 9 BT.2020)
    and color_range (1 MPEG, limited; 2 JPEG, full)."""
    planes = np.stack([p for p, _ in decoded[(640, 480)][:4]])
    expected = []
    for frame_planes in planes:
        frame = av.VideoFrame.from_ndarray(frame_planes, format="yuv420p")
        frame.colorspace, frame.color_range = tag, 2 if full_range else 1
        expected.append(frame.to_ndarray(format="bgr24"))
    ours = yuv420p_to_bgr(torch.from_numpy(planes), colorspace, full_range).numpy()
    np.testing.assert_array_equal(ours, np.stack(expected))


def test_yuv420p_planes_are_read_in_pyavs_layout():
    """A grey picture with one 2x2 block of strong blue (U high) and one of strong red (V high)."""
    height, width = 4, 8
    frame = av.VideoFrame(width, height, "yuv420p")
    y = np.full((height, width), 100, np.uint8)
    u = np.full((height // 2, width // 2), 128, np.uint8)
    v = u.copy()
    u[0, 1], v[1, 3] = 240, 240
    for plane, values in zip(frame.planes, (y, u, v)):
        padded = np.zeros((plane.height, plane.line_size), np.uint8)
        padded[:, : plane.width] = values
        plane.update(padded.tobytes())
    ours = yuv420p_to_bgr(torch.from_numpy(frame.to_ndarray(format="yuv420p"))[None])[0].numpy()
    np.testing.assert_array_equal(ours, frame.to_ndarray(format="bgr24"))
    assert ours[0:2, 2:4, 0].min() > 200 and ours[2:4, 6:8, 2].min() > 200  # blue at U's block, red at V's


@pytest.mark.parametrize(
    "frame, pixel_format, error",
    [
        (torch.zeros(10, 10, 3), "bgr24", "uint8 HxWx3"),
        (torch.zeros(10, 10, dtype=torch.uint8), "yuv420p", "yuv420p planes"),  # 10 rows: not H * 3 / 2
        (torch.zeros(12, 9, dtype=torch.uint8), "yuv420p", "yuv420p planes"),  # odd width
        (torch.zeros(10, 10, 3, dtype=torch.uint8), "yuv420p", "yuv420p planes"),
        (torch.zeros(12, 10, dtype=torch.uint8), "nv12", "unknown pixel format 'nv12'"),
    ],
)
def test_letterbox_refuses_frames_that_do_not_fit_their_format(frame, pixel_format, error):
    with pytest.raises(ValueError, match=error):
        letterbox_frames([frame], (64, 64), Preprocess(), torch.empty(1, 3, 64, 64), [PixelLayout(pixel_format)])


def test_letterbox_wants_one_pixel_format_per_frame():
    frames = [torch.zeros(12, 10, dtype=torch.uint8)] * 2
    with pytest.raises(ValueError, match="2 frames but 1 layouts"):
        letterbox_frames(frames, (64, 64), Preprocess(), torch.empty(2, 3, 64, 64), [PixelLayout("yuv420p")])
    with pytest.raises(ValueError, match="unknown colorspace 'bt470m' .bt601 | bt709 | bt2020."):
        letterbox_frames(frames, (64, 64), Preprocess(), torch.empty(2, 3, 64, 64),
                         [PixelLayout("yuv420p", "bt709"), PixelLayout("yuv420p", "bt470m")])  # fmt: skip


# --- the letterbox -------------------------------------------------------------------------------


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    """Uniform noise: every rounding of the resize shows."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "sizes, input_hw",
    [
        ([(480, 640), (960, 1280), (200, 320)], (416, 416)),  # down by 1.54 and 3.08, up by 1.3
        ([(1080, 1920), (720, 1280)], (640, 640)),  # down by 3, by 2 (OpenCV's INTER_AREA case)
        ([(640, 480), (777, 301), (60, 100), (90, 50)], (416, 416)),  # portrait (rows of any width), small, up 4x
        ([(416, 416), (300, 417)], (416, 416)),  # exact fit (no resize), down by one column
        ([(480, 640)], (384, 640)),  # a rectangular input
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_resize_is_opencvs_inter_linear_bit_for_bit(sizes, input_hw, device):
    frames = [_noise(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    out = torch.full((len(frames) + 1, 3, *input_hw), -1.0, device=device)
    scales = letterbox_frames([torch.from_numpy(f).to(device) for f in frames], input_hw, Preprocess(), out)
    out = out.cpu()
    for index, frame in enumerate(frames):
        expected = letterbox(frame, input_hw)
        assert scales[index] == expected.scale
        np.testing.assert_array_equal(out[index].numpy(), expected.tensor, err_msg=f"frame {sizes[index]}")
    assert (out[-1] == -1.0).all()  # rows past the frames are not touched


def test_resize_linear_alone_is_cv2_resize():
    image = _noise(123, 77, 5)
    for new_hw in ((50, 31), (300, 200), (123, 40), (7, 77)):
        ours = resize_linear(torch.from_numpy(image).permute(2, 0, 1)[None], new_hw)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, cv2.resize(image, new_hw[::-1], interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize(
    "preprocess",
    [Preprocess(pad_value=0, channel_order="rgb"), Preprocess(mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0), scale=2.0)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_letterbox_applies_channel_order_and_normalisation_as_the_cpu_does(preprocess, bccd_images, device):
    frames = bccd_images[:4]
    out = torch.empty(len(frames), 3, *INPUT_HW, device=device)
    letterbox_frames([torch.from_numpy(f).to(device) for f in frames], INPUT_HW, preprocess, out)
    out = out.cpu()
    for index, frame in enumerate(frames):
        np.testing.assert_array_equal(out[index].numpy(), letterbox(frame, INPUT_HW, preprocess).tensor)


class DivisionRecorder(torch.overrides.TorchFunctionMode):
    """Records the divisor of every Tensor.div_ (torch function mode: sees the call as the caller wrote it)."""

    def __init__(self):
        super().__init__()
        self.divisors = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.div_:
            self.divisors.append(args[1])
        return func(*args, **(kwargs or {}))


def test_the_std_division_is_a_true_division_on_the_device_not_by_a_python_scalar(bccd_images):
    """CUDA divides by a CPU scalar (a Python number) as a multiply by its reciprocal, up to 1 ulp off the host's
    float32 division (on the CPU, torch divides either way, so the bit-exact test above cannot see it there): the
    divisor must be a tensor on out's device, holding std in float32."""
    preprocess = Preprocess(mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0), scale=2.0)
    out = torch.empty(1, 3, *INPUT_HW)
    with DivisionRecorder() as recorder:
        letterbox_frames([torch.from_numpy(bccd_images[0])], INPUT_HW, preprocess, out)
    assert len(recorder.divisors) == 3
    for divisor, std in zip(recorder.divisors, preprocess.std):
        assert isinstance(divisor, torch.Tensor) and divisor.device == out.device and divisor.dtype == torch.float32
        assert divisor.item() == np.float32(std)


def test_yuv420p_frames_letterbox_as_their_bgr24_decode_does_on_the_cpu(decoded):
    """Sizes, formats and colorspaces mixed in one batch; the reference: the CPU letterbox of PyAV's bgr24 decode."""
    frames = [decoded[(640, 480)][0], decoded[(1280, 960)][0], decoded[(320, 200)][1], decoded[(640, 480)][5]]
    formats = ["yuv420p", "bgr24", "yuv420p", "yuv420p"]
    colorspaces = ["bt601", "bt709", "bt601", "bt709"]  # ignored for the bgr24 frame
    tagged = av.VideoFrame.from_ndarray(frames[3][0], format="yuv420p")
    tagged.colorspace = 1  # BT.709
    frames[3] = (frames[3][0], tagged.to_ndarray(format="bgr24"))
    images = [torch.from_numpy(planes if fmt == "yuv420p" else bgr) for (planes, bgr), fmt in zip(frames, formats)]
    out = torch.empty(len(frames), 3, *INPUT_HW)
    layouts = [PixelLayout(fmt, colorspace) for fmt, colorspace in zip(formats, colorspaces)]
    scales = letterbox_frames(images, INPUT_HW, Preprocess(), out, layouts)
    for index, (_, bgr) in enumerate(frames):
        expected = letterbox(bgr, INPUT_HW)
        assert scales[index] == expected.scale
        np.testing.assert_array_equal(out[index].numpy(), expected.tensor)


# --- the whole device path against ONNX Runtime --------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(SHIPPED)


@pytest.fixture(scope="module")
def net(shipped):
    return load_model(shipped)


def _device_path(
    net, bundle, images: list[np.ndarray], formats: list[str], full_range: list[bool] | None = None, chunk: int = 4
) -> list[Detections]:
    """Device letterbox -> the torch model -> postprocess_on_device, `chunk` frames at a time (on the CPU here)."""
    detections, full_range = [], full_range or [False] * len(images)
    for start in range(0, len(images), chunk):
        frames, fmts = images[start : start + chunk], formats[start : start + chunk]
        out = torch.empty(len(frames), 3, *bundle.meta.input_hw)
        scales = letterbox_frames([torch.from_numpy(f) for f in frames], tuple(bundle.meta.input_hw), bundle.meta.preprocess,
                                  out, [PixelLayout(fmt, "bt601", full) for fmt, full in zip(fmts, full_range[start : start + chunk])])  # fmt: skip
        source_hw = [(f.shape[0] * 2 // 3, f.shape[1]) if fmt == "yuv420p" else f.shape[:2] for f, fmt in zip(frames, fmts)]
        with torch.inference_mode():
            detections += postprocess_on_device(net(out), scales, source_hw, CONF, IOU)
    return detections


def _onnxruntime(bundle, images_bgr: list[np.ndarray]) -> list[Detections]:
    """The reference: CPU letterbox -> ONNX Runtime -> streamd.model.postprocess."""
    backend = make_backend(bundle, OnnxRuntimeConfig(type="onnxruntime", threads=1), max_batch=4)
    return Detector.for_bundle(bundle, backend).detect(images_bgr, CONF, IOU)


def _worst_match(expected: list[Detections], actual: list[Detections]) -> tuple[float, float, int]:
    """Frame by frame, each box of either side matched to the best box of its class on the other side.

    Returns the lowest matched IoU, the largest score difference of a match, and the boxes compared. A box
    without a match at MIN_IOU fails, unless its score is within SCORE_TOLERANCE of CONF (it may fall on
    either side of the threshold).
    """
    worst_iou, worst_score, boxes = 1.0, 0.0, 0
    for frame, (left, right) in enumerate(zip(expected, actual)):
        for ours, theirs in ((left, right), (right, left)):
            for box, score, label in zip(ours.xyxy, ours.confidence, ours.class_id):
                boxes += 1
                same = theirs[theirs.class_id == label]
                ious = box_iou(box, same.xyxy) if len(same) else np.zeros(1)
                best = int(ious.argmax())
                if ious[best] < MIN_IOU:
                    assert score < CONF + SCORE_TOLERANCE, f"frame {frame}: {label} {score:.3f} {box}: IoU {ious[best]:.3f}"
                    continue
                worst_iou = min(worst_iou, float(ious[best]))
                worst_score = max(worst_score, abs(float(same.confidence[best]) - float(score)))
    return worst_iou, worst_score, boxes


def test_device_path_gives_onnxruntimes_detections(shipped, net, bccd_images):
    expected = _onnxruntime(shipped, bccd_images)
    assert sum(len(d) for d in expected) > 150  # real cells were found
    worst_iou, worst_score, boxes = _worst_match(expected, _device_path(net, shipped, bccd_images, ["bgr24"] * 12))
    assert boxes > 300 and worst_iou >= MIN_IOU and worst_score <= SCORE_TOLERANCE
    # Measured on 48 BCCD images (721 boxes): IoU >= 0.999995, scores within 3e-6: the letterbox is OpenCV's to the
    # bit, torch and ONNX Runtime differ only in float summation order. The float bilinear letterbox reached 0.93.


def test_yuv420p_frames_give_onnxruntimes_detections_of_their_bgr24_decode(shipped, net, decoded, decoded_full_range):
    """Limited and full range frames. Full range scaled to limited on the CPU first (3 grey levels off) was
    measured at IoU down to 0.78 on BCCD (12% of boxes below 0.98): its planes go to the device as decoded."""
    limited = [frame for size in ((640, 480), (1280, 960), (320, 200)) for frame in decoded[size]]
    frames = limited + decoded_full_range
    expected = _onnxruntime(shipped, [bgr for _, bgr in frames])
    assert sum(len(d) for d in expected) > 150
    full_range = [False] * len(limited) + [True] * len(decoded_full_range)
    actual = _device_path(net, shipped, [planes for planes, _ in frames], ["yuv420p"] * len(frames), full_range)
    worst_iou, worst_score, _ = _worst_match(expected, actual)
    assert worst_iou >= MIN_IOU and worst_score <= SCORE_TOLERANCE


# --- postprocess_on_device -----------------------------------------------------------------------


def _random_output(frames: int, anchors: int, classes: int, seed: int) -> np.ndarray:
    """Crowded random boxes in a 416 input (many overlaps, so NMS works) with sigmoid-like scores."""
    rng = np.random.default_rng(seed)
    output = np.empty((frames, anchors, 5 + classes), np.float32)
    output[..., :2] = rng.uniform(0, 416, (frames, anchors, 2))
    output[..., 2:4] = rng.uniform(4, 120, (frames, anchors, 2))
    output[..., 4:] = rng.uniform(0, 1, (frames, anchors, 1 + classes)) ** 2
    return output


def _assert_same(expected: list[Detections], actual: list[Detections]) -> None:
    assert len(expected) == len(actual)
    for frame, (left, right) in enumerate(zip(expected, actual)):
        assert len(left) == len(right), f"frame {frame}: {len(left)} vs {len(right)} boxes"
        np.testing.assert_array_equal(right.class_id, left.class_id)
        np.testing.assert_array_equal(right.confidence, left.confidence)
        np.testing.assert_array_equal(right.xyxy, left.xyxy)


@pytest.mark.parametrize(
    "frames, classes, conf, scales, source_hw",
    [
        (3, 3, 0.3, [0.65, 0.325, 1.3], [(480, 640), (960, 1280), (200, 320)]),
        # letterbox scale x prescale: a 1280x960 source decoded at 640x480 (0.65 x 0.5); boxes clip at the edges
        (2, 80, 0.05, [0.65 * 0.5, 0.65 * 0.25], [(960, 1280), (1920, 2560)]),
        (1, 1, 0.5, [1.0], [(416, 416)]),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_postprocess_on_device_equals_postprocess_on_random_outputs(frames, classes, conf, scales, source_hw, device):
    output = _random_output(frames, 3549, classes, seed=classes)
    scales = np.asarray(scales, np.float32)  # what Detector hands postprocess
    expected = postprocess(output, scales, source_hw, conf, IOU)
    assert sum(len(d) for d in expected) > 10 * frames
    on_device = torch.from_numpy(output).to(device)
    _assert_same(expected, postprocess_on_device(on_device, [float(s) for s in scales], source_hw, conf, IOU))


def test_postprocess_on_device_equals_postprocess_on_real_outputs(shipped, net, bccd_images):
    frames = bccd_images[:4]
    out = torch.empty(len(frames), 3, *INPUT_HW)
    scales = letterbox_frames([torch.from_numpy(f) for f in frames], INPUT_HW, shipped.meta.preprocess, out)
    with torch.inference_mode():
        output = net(out)
    prescales = np.asarray([0.5, 1.0, 2.0, 0.25], np.float32)
    combined = np.asarray(scales, np.float32) * prescales
    source_hw = [(int(f.shape[0] / p), int(f.shape[1] / p)) for f, p in zip(frames, prescales)]
    expected = postprocess(output.numpy(), combined, source_hw, CONF, IOU)
    assert all(len(d) for d in expected)
    _assert_same(expected, postprocess_on_device(output, [float(s) for s in combined], source_hw, CONF, IOU))


def test_postprocess_on_device_drops_the_invalid_rows_postprocess_drops():
    """NaN and infinite values, zero and negative sizes and boxes wholly outside the frame: the device drops the rows the host drops (streamd.model.postprocess), so both publish the same boxes."""
    output = _random_output(2, 400, 3, seed=5)
    output[:, :80, 4] = np.linspace(0.9, 0.99, 80)  # above the threshold, no ties: only the checks can drop them
    output[0, :20, 0] = np.nan
    output[0, 20:40, 5] = np.inf
    output[1, :20, 2] = 0.0
    output[1, 20:40, 3] = -5.0
    output[1, 60:80, :2] = 5000.0  # outside a 416 x 416 frame once clipped
    scales, source_hw = np.ones(2, np.float32), [(416, 416)] * 2
    expected = postprocess(output, scales, source_hw, CONF, IOU)
    _assert_same(expected, postprocess_on_device(torch.from_numpy(output), list(scales), source_hw, CONF, IOU))


def test_postprocess_on_device_with_nothing_above_the_threshold():
    output = _random_output(3, 500, 2, seed=1)
    output[1, :, 4] = 0.0  # the middle frame: no box above any threshold
    scales, source_hw = [1.0, 1.0, 1.0], [(416, 416)] * 3
    detections = postprocess_on_device(torch.from_numpy(output), scales, source_hw, CONF, IOU)
    _assert_same(postprocess(output, np.ones(3, np.float32), source_hw, CONF, IOU), detections)
    assert len(detections[0]) and not len(detections[1]) and detections[1].xyxy.shape == (0, 4)
    nothing = postprocess_on_device(torch.from_numpy(output), scales, source_hw, 1.01, IOU)  # no box in any frame
    assert [len(d) for d in nothing] == [0, 0, 0]
    assert postprocess_on_device(torch.zeros(0, 500, 7), [], [], CONF, IOU) == []


@pytest.mark.parametrize(
    "shape, scales, error",
    [((2, 100), [1.0, 1.0], r"expected model output \[N, A, 5 \+ C\]"), ((2, 100, 7), [1.0], "2 outputs but 1 scales")],
)
def test_postprocess_on_device_refuses_what_does_not_fit(shape, scales, error):
    with pytest.raises(ValueError, match=error):
        postprocess_on_device(torch.zeros(shape), scales, [(416, 416)] * 2, CONF, IOU)
