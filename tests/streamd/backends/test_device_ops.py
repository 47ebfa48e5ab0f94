"""streamd.backends.device_ops on the CPU: yuv420p planes convert to swscale's bgr24, the device letterbox matches
OpenCV's, and postprocess_on_device matches streamd.model.postprocess."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from streamd.backends.device_ops import letterbox_frames, yuv420p_to_bgr
from streamd.model.bundle import Preprocess

INPUT_HW = (416, 416)


# --- real decoded frames -------------------------------------------------------------------------


def _encode(path: Path, images_bgr: list[np.ndarray]) -> Path:
    """Write the images as an H.264 yuv420p video with PyAV (untagged: swscale reads it as BT.601 limited range)."""
    height, width = images_bgr[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
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
def decoded(bccd_root, tmp_path_factory) -> dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]]:
    """Real H.264 frames at the tests' mixed sizes (W, H), decoded as yuv420p planes and as bgr24.

    640x480: testsrc2 then BCCD images as a slideshow; 1280x960 and 320x200: BCCD images resized.
    """
    names = (bccd_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:8]
    bccd = [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]
    folder = tmp_path_factory.mktemp("yuv")
    sources = {
        (640, 480): _testsrc2(640, 480, 3) + bccd,
        (1280, 960): [cv2.resize(image, (1280, 960)) for image in bccd[:3]],
        (320, 200): [cv2.resize(image, (320, 200)) for image in bccd[:3]],
    }
    return {size: _decode(_encode(folder / f"{size[0]}x{size[1]}.mp4", images)) for size, images in sources.items()}


# --- colour conversion ---------------------------------------------------------------------------


def test_yuv420p_to_bgr_is_swscales_bgr24_bit_for_bit(decoded):
    for size, frames in decoded.items():
        planes = torch.stack([torch.from_numpy(p) for p, _ in frames])
        ours = yuv420p_to_bgr(planes).permute(0, 2, 3, 1).numpy()
        theirs = np.stack([bgr for _, bgr in frames]).astype(np.float32)
        assert ours.shape == theirs.shape == (len(frames), size[1], size[0], 3)
        np.testing.assert_array_equal(ours, theirs)


def test_yuv420p_planes_are_read_in_pyavs_layout():
    """A flat grey picture with one 2x2 block of strong blue (U high) and one of strong red (V high)."""
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
    planes = frame.to_ndarray(format="yuv420p")
    ours = yuv420p_to_bgr(torch.from_numpy(planes)[None])[0].permute(1, 2, 0).numpy()
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
        letterbox_frames([frame], (64, 64), Preprocess(), torch.empty(1, 3, 64, 64), pixel_formats=[pixel_format])


def test_letterbox_wants_one_pixel_format_per_frame():
    frames = [torch.zeros(12, 10, dtype=torch.uint8)] * 2
    with pytest.raises(ValueError, match="2 frames but 1 pixel formats"):
        letterbox_frames(frames, (64, 64), Preprocess(), torch.empty(2, 3, 64, 64), pixel_formats=["yuv420p"])


def test_yuv420p_frames_letterbox_as_their_bgr24_decode(decoded):
    """Mixed sizes and formats in one batch give what the bgr24 decode of each frame gives."""
    frames = [decoded[(640, 480)][0], decoded[(1280, 960)][0], decoded[(320, 200)][1], decoded[(640, 480)][5]]
    formats = ["yuv420p", "bgr24", "yuv420p", "yuv420p"]
    images = [torch.from_numpy(planes if fmt == "yuv420p" else bgr) for (planes, bgr), fmt in zip(frames, formats)]
    out = torch.empty(len(frames), 3, *INPUT_HW)
    scales = letterbox_frames(images, INPUT_HW, Preprocess(), out, pixel_formats=formats)
    expected = torch.empty_like(out)
    assert scales == letterbox_frames([torch.from_numpy(bgr) for _, bgr in frames], INPUT_HW, Preprocess(), expected)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
