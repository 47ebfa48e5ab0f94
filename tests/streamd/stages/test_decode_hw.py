"""streamd.stages.decode and .decoder: streams[].hwaccel and decoder_threads, and frames as yuv420p planes.

Real files made with ffmpeg (tests/streamd/media.py) or, where ffmpeg cannot make them or is absent (the GPU
machine), with PyAV. Without a GPU, hwaccel cuda is tested through its fallback to the CPU; the gpu-marked
test at the end compares NVDEC's frames with the CPU decoder's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from av.codec.hwaccel import HWAccel, hwdevices_available

from streamd.config import SourceKind, StreamConfig
from streamd.ops.metrics import Metrics
from streamd.stages import decode as decode_module
from streamd.stages import decoder
from streamd.stages.decode import AVSource, FreezeDetector, open_source
from streamd.types import BGR24, Frame, PixelLayout
from tests.streamd import media

FPS = 25
FRAMES = 12
SIZE = (160, 120)  # width, height
GPU = decoder.nvidia_gpu_present()
DECODE_LOG = "streamd.stages.decode"


def pyav_video(
    path: Path, *, size: tuple[int, int], frames: int, pix_fmt: str = "yuv420p", codec: str = "libx264",
    colorspace: int | None = None,
) -> Path:  # fmt: skip
    """A video of colour ramps and a moving box, made with PyAV alone. size: (width, height). colorspace: the
    matrix its frames are tagged with (FFmpeg's AVColorSpace: 1 BT.709, 9 BT.2020), and converted with."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    images = []
    for n in range(frames):
        ramps = [cols * 255 // max(1, width - 1), rows * 255 // max(1, height - 1), np.full_like(cols, n * 9 % 256)]
        image = np.stack(ramps, axis=-1).astype(np.uint8)
        x = n * 4 % max(1, width - 16)
        image[height // 3 : height // 3 + 16, x : x + 16] = (40, 200, 240)
        images.append(image)
    options = {"preset": "ultrafast", "bf": "0", "g": "10"} if codec == "libx264" else {}
    media.encode_images(path, images, fps=FPS, codec=codec, pix_fmt=pix_fmt, options=options, colorspace=colorspace)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """H.264 yuv420p and MJPEG yuvj420p (ffmpeg), H.264 yuv422p and MPEG-4 yuv420p of odd size (PyAV)."""
    folder = tmp_path_factory.mktemp("hw")
    return {
        "h264": media.make_video(folder / "h264.mp4", size=SIZE, fps=FPS, frames=FRAMES, gop=10),
        "mjpeg": media.make_video(folder / "mjpeg.avi", size=SIZE, fps=FPS, frames=FRAMES, codec="mjpeg"),
        "yuv422p": pyav_video(folder / "422.mp4", size=SIZE, frames=FRAMES, pix_fmt="yuv422p"),
        "bt709": pyav_video(folder / "709.mp4", size=SIZE, frames=FRAMES, colorspace=1),
        "bt2020": pyav_video(folder / "2020.mp4", size=SIZE, frames=FRAMES, colorspace=9),
        "odd": pyav_video(folder / "odd.avi", size=(161, 121), frames=FRAMES, codec="mpeg4"),
    }


def decode(path: Path, stream_id: str = "cam-1", *, pixel_format: str = "bgr24", **fields) -> list[Frame]:
    """Every frame of a file, opened as `streamd validate` and compose would."""
    config = StreamConfig.model_validate({"id": stream_id, "source": str(path), **fields})
    source = open_source(config, Metrics([stream_id]), pixel_format=pixel_format)
    source.open()
    try:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        return frames
    finally:
        source.close()


def decoder_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """(level, message) of the log lines saying which decoder a stream got."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == DECODE_LOG and " on " in r.getMessage()]


# --- which decoder -------------------------------------------------------------------------------------


@pytest.mark.skipif(GPU, reason="an NVIDIA GPU is here: cuda opens (test_nvdec_frames_equal_the_cpu_decoders)")
def test_hwaccel_cuda_without_a_device_decodes_on_the_cpu_with_a_warning(clips, caplog):
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    frames = decode(clips["h264"], "cam-7", hwaccel="cuda")
    ((level, line),) = decoder_lines(caplog)
    assert level == logging.WARNING
    assert line.startswith("stream 'cam-7': h264 on the CPU, ") and "(hwaccel cuda: " in line
    reason = "NVDEC did not open: " if "cuda" in hwdevices_available() else "was built without cuda"
    assert reason in line
    reference = decode(clips["h264"], hwaccel="none")
    assert len(frames) == len(reference) == FRAMES
    for frame, expected in zip(frames, reference):
        np.testing.assert_array_equal(frame.image, expected.image)


@pytest.mark.skipif(GPU, reason="an NVIDIA GPU is here: auto tries NVDEC")
@pytest.mark.parametrize("hwaccel", ["auto", "none"])
def test_auto_without_a_gpu_and_none_decode_on_the_cpu_without_a_word(clips, caplog, hwaccel):
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    assert len(decode(clips["h264"], hwaccel=hwaccel)) == FRAMES
    ((level, line),) = decoder_lines(caplog)
    assert level == logging.INFO and line.startswith("stream 'cam-1': h264 on the CPU, ") and "hwaccel" not in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.skipif(GPU or "cuda" not in hwdevices_available(), reason="needs a cuda FFmpeg without a usable GPU")
def test_auto_tries_nvdec_when_a_gpu_is_there_and_says_why_not_at_info(clips, caplog, monkeypatch):
    monkeypatch.setattr(decoder, "nvidia_gpu_present", lambda: True)  # the driver's nodes, without a device that opens
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    assert len(decode(clips["h264"], hwaccel="auto")) == FRAMES
    ((level, line),) = decoder_lines(caplog)
    assert level == logging.INFO and "h264 on the CPU" in line and "(hwaccel auto: NVDEC did not open: " in line


def test_nvdec_is_tried_on_the_shared_context_then_on_its_own_then_the_cpu(clips, caplog, monkeypatch):
    """hwaccel_for's candidates are opened in order (the primary CUDA context inference uses, then a context of the
    stream's own), each failure falling through, and the CPU last; the GPU is the backend's (cuda_device)."""
    asked, opened = [], []
    monkeypatch.setattr(decode_module, "hwaccel_for", lambda mode, device: (asked.append((mode, device)) or ("shared", "own"), None))
    real_open = decode_module.av.open

    def fake_open(url, **kwargs):
        opened.append(kwargs["hwaccel"])
        if kwargs["hwaccel"] is not None:
            raise av.error.OSError(1, f"{kwargs['hwaccel']} context refused")
        return real_open(url, **{k: v for k, v in kwargs.items() if k != "hwaccel"})

    monkeypatch.setattr(decode_module.av, "open", fake_open)
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    config = StreamConfig(id="cam-1", source=str(clips["h264"]), hwaccel="cuda")
    source = open_source(config, Metrics(["cam-1"]), cuda_device=1)
    source.open()
    try:
        assert source.read() is not None
    finally:
        source.close()
    assert asked == [("cuda", 1)] and opened == ["shared", "own", None]
    ((level, line),) = decoder_lines(caplog)
    assert level == logging.WARNING and "h264 on the CPU" in line and "NVDEC did not open: " in line and "own context" in line


@pytest.mark.skipif("cuda" not in hwdevices_available(), reason="an FFmpeg without cuda")
def test_hwaccel_for_names_the_backends_gpu_and_the_shared_context_first(monkeypatch):
    monkeypatch.setattr(decoder, "nvidia_gpu_present", lambda: True)
    candidates, why_not = decoder.hwaccel_for("auto", 1)
    assert why_not is None and len(candidates) == 2 and all(isinstance(c, HWAccel) for c in candidates)
    made = []  # HWAccel keeps its settings to itself: record what it was built with
    monkeypatch.setattr(decoder, "HWAccel", lambda kind, **settings: made.append((kind, settings)) or kind)
    decoder.hwaccel_for("cuda", 1)
    assert made == [("cuda", {"device": "1", "allow_software_fallback": True, "options": {"primary_ctx": "1"}}),
                    ("cuda", {"device": "1", "allow_software_fallback": True})]  # fmt: skip
    assert decoder.hwaccel_for("none", 1) == ((), None)


def test_the_decoder_is_named_again_after_a_reopen_only_when_it_changed(clips, caplog):
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    config = StreamConfig(id="cam-1", source=str(clips["h264"]), hwaccel="none", decoder_threads=2)
    source = open_source(config, Metrics(["cam-1"]))
    for _ in range(2):  # a reconnect to the same decoder
        source.open()
        source.read()
    source.decoder_threads = 1  # the next open gets another decoder
    source.open()
    source.read()
    source.close()
    assert [line for _, line in decoder_lines(caplog)] == ["stream 'cam-1': h264 on the CPU, 2 threads",
                                                         "stream 'cam-1': h264 on the CPU, 1 thread"]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decoder_threads_reach_the_codec(clips, caplog, threads):
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    assert len(decode(clips["h264"], hwaccel="none", decoder_threads=threads)) == FRAMES
    ((_, line),) = decoder_lines(caplog)
    expected = f"stream 'cam-1': h264 on the CPU, {threads} thread{'s' if threads > 1 else ''}"
    assert line == expected  # read back from the open codec context


# --- yuv420p planes ------------------------------------------------------------------------------------

# What the device makes of the planes (streamd.backends.device_ops.yuv420p_to_bgr, swscale's arithmetic for the
# frame's matrix and range) against the decoder's own bgr24: bit for bit from a 4:2:0 source, whatever its tags.
# From 4:2:2 the planes lose half the chroma rows (swscale reformats them to 4:2:0), so colour edges differ:
# limits measured here, mean 1.2 and 99th percentile 4 levels.
PLANES_LAYOUTS = {
    "h264": ("bt601", False, None), "mjpeg": ("bt601", True, None), "bt709": ("bt709", False, None),
    "bt2020": ("bt2020", False, None), "yuv422p": ("bt601", False, (2.0, 6, 0.03)),  # mean, p99, >3 share
}  # fmt: skip


@pytest.mark.parametrize("clip", list(PLANES_LAYOUTS))
def test_yuv420p_planes_carry_their_layout_and_convert_to_the_bgr_frames(clips, clip):
    torch = pytest.importorskip("torch")
    from streamd.backends.device_ops import yuv420p_to_bgr

    planes = decode(clips[clip], pixel_format="yuv420p", hwaccel="none")
    bgr = decode(clips[clip], hwaccel="none")
    assert len(planes) == len(bgr) == FRAMES
    colorspace, full_range, tolerance = PLANES_LAYOUTS[clip]
    for frame, reference in zip(planes, bgr):
        assert frame.layout == PixelLayout("yuv420p", colorspace, full_range)
        assert frame.image.shape == (180, 160) and frame.image.dtype == np.uint8
        assert frame.image_hw == (120, 160) and (frame.height, frame.width) == (120, 160) and frame.source_hw is None
        assert not frame.image.flags.writeable
        converted = yuv420p_to_bgr(torch.from_numpy(frame.image.copy())[None], colorspace, full_range)[0].numpy()
        if tolerance is None:
            np.testing.assert_array_equal(converted, reference.image)
        else:
            difference = np.abs(converted.astype(int) - reference.image)
            mean_max, p99_max, share_max = tolerance
            assert difference.mean() <= mean_max and np.percentile(difference, 99) <= p99_max
            assert (difference > 3).mean() <= share_max


def test_a_yuvj_frame_without_a_range_tag_is_full_range_as_its_format_says(clips):
    """yuvj420p is full range by definition: untagged, to_ndarray would rescale it to limited range (up to 20 levels
    off) and the device would expand it again."""
    with av.open(str(clips["mjpeg"])) as container:
        av_frame = next(container.decode(video=0))
    assert av_frame.format.name == "yuvj420p"
    tagged, tagged_layout, _, _ = decoder.frame_pixels(av_frame, "yuv420p", None)
    av_frame.color_range = 0  # unspecified
    untagged, untagged_layout, _, _ = decoder.frame_pixels(av_frame, "yuv420p", None)
    assert untagged_layout == tagged_layout == PixelLayout("yuv420p", "bt601", True)
    np.testing.assert_array_equal(untagged, tagged)


def test_a_frame_of_a_matrix_the_device_does_not_convert_goes_out_as_bgr24(clips):
    with av.open(str(clips["h264"])) as container:
        av_frame = next(container.decode(video=0))
    for own_matrix in (4, 7):  # FCC, SMPTE 240M: swscale converts them, the device does not
        av_frame.colorspace = own_matrix
        image, layout, _, _ = decoder.frame_pixels(av_frame, "yuv420p", None)
        assert layout == BGR24 and image.shape == (120, 160, 3)


@pytest.mark.parametrize("tag, layout", [(8, "bt601"), (10, "bt2020"), (11, "bt601"), (14, "bt601")])
def test_a_matrix_swscale_refuses_is_converted_as_the_nearest_it_has(clips, tag, layout):
    """YCgCo (8) and BT.2020 CL (10) up to ICtCp (14): swscale's bgr24 raises "Operation not supported", which
    would fail every frame of such a stream; it is converted as BT.2020 NCL (10) or BT.601, both ways alike."""
    with av.open(str(clips["h264"])) as container:
        av_frames = [frame for _, frame in zip(range(2), container.decode(video=0))]
    av_frames[0].colorspace = av_frames[1].colorspace = tag
    bgr, bgr_layout, _, _ = decoder.frame_pixels(av_frames[0], "bgr24", None)
    planes, planes_layout, _, _ = decoder.frame_pixels(av_frames[1], "yuv420p", None)
    assert bgr_layout == BGR24 and bgr.shape == (120, 160, 3)
    assert planes_layout == PixelLayout("yuv420p", layout) and planes.shape == (180, 160)


@pytest.mark.parametrize("pixel_format", ["bgr24", "yuv420p"])
def test_nvdecs_nv12_gives_the_cpu_decoders_pixels(clips, pixel_format):
    """NVDEC hands over nv12 (its 8-bit 4:2:0, downloaded by FFmpeg): the same samples as the CPU decoder's
    yuv420p, interleaved. Every output kind from it equals the CPU decoder's, bit for bit, limited or full range."""
    for clip in ("h264", "mjpeg"):
        with av.open(str(clips[clip])) as container:
            for av_frame in container.decode(video=0):
                nv12 = av_frame.reformat(format="nv12")
                for model_hw in [None] if pixel_format == "yuv420p" else [None, (64, 64)]:
                    got = decoder.frame_pixels(nv12, pixel_format, model_hw)
                    expected = decoder.frame_pixels(av_frame, pixel_format, model_hw)
                    assert got[1:] == expected[1:]
                    np.testing.assert_array_equal(got[0], expected[0])


def test_an_odd_sized_frame_goes_out_as_bgr24(clips):
    frames = decode(clips["odd"], pixel_format="yuv420p", hwaccel="none")
    assert len(frames) == FRAMES
    for frame in frames:
        assert frame.pixel_format == "bgr24" and frame.image.shape == (121, 161, 3) and frame.image_hw == (121, 161)


def test_model_hw_and_yuv420p_exclude_each_other(clips):
    config = StreamConfig(id="cam-3", source=str(clips["h264"]))
    with pytest.raises(ValueError, match=r"stream 'cam-3': model_hw .* and pixel_format 'yuv420p' .* exclude each"):
        open_source(config, Metrics(["cam-3"]), model_hw=(416, 416), pixel_format="yuv420p")
    with pytest.raises(ValueError, match="stream 'cam-3': pixel_format must be one of"):
        open_source(config, Metrics(["cam-3"]), pixel_format="nv12")


def test_a_frozen_picture_is_found_in_the_planes(tmp_path):
    """The freeze detector reads the Y plane of a yuv420p frame; a still picture (a frozen capture card) is flagged."""
    still = tmp_path / "still.mp4"
    with av.open(str(still), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        image = av.VideoFrame.from_ndarray(np.full((120, 160, 3), 90, np.uint8), format="bgr24")
        for _ in range(FRAMES):
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    # read as a live source would be (frozen_after_s applies to live streams only)
    source = AVSource("card-1", str(still), kind=SourceKind.UDP, metrics=Metrics(["card-1"]), frozen_after_s=0.2,
                      pixel_format="yuv420p")  # fmt: skip
    source.open()
    try:
        frames = [source.read() for _ in range(FRAMES)]
    finally:
        source.close()
    assert all(f.pixel_format == "yuv420p" for f in frames)
    assert not any(f.frozen for f in frames[:5]) and all(f.frozen for f in frames[7:])  # 0.2 s: 5 or 6 frames


def test_the_freeze_detector_starts_again_when_the_picture_changes_kind():
    detector = FreezeDetector(after_s=0.1)  # at 10 fps: 2 unchanged frames (never fewer)
    grey = np.full((120, 160, 3), 80, np.uint8)
    assert [detector.update(grey, n / 10) for n in range(3)] == [False, False, True]
    assert detector.update(grey[:, :, 0], 0.3) is False  # a Y plane after BGR frames: no comparison across kinds


# --- NVDEC (run by benchmarks/gpu_check.py on a GPU machine) -------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not GPU or "cuda" not in hwdevices_available(), reason="no NVIDIA GPU, or an FFmpeg without cuda")
@pytest.mark.parametrize("pixel_format", ["bgr24", "yuv420p"])
def test_nvdec_frames_equal_the_cpu_decoders(tmp_path, caplog, pixel_format):
    """H.264 decoding is exact by the standard, and nv12 -> yuv420p is a copy: NVDEC's frames are the CPU's
    within 1 grey level (expected: equal)."""
    clip = pyav_video(tmp_path / "720p.mp4", size=(1280, 720), frames=30)  # the GPU machine has no ffmpeg binary
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    on_gpu = decode(clip, "gpu-1", pixel_format=pixel_format, hwaccel="cuda")
    assert ("stream 'gpu-1': h264 on NVDEC (cuda)") in [line for _, line in decoder_lines(caplog)]
    on_cpu = decode(clip, "cpu-1", pixel_format=pixel_format, hwaccel="none")
    assert len(on_gpu) == len(on_cpu) == 30
    for frame, reference in zip(on_gpu, on_cpu):
        assert frame.pixel_format == reference.pixel_format == pixel_format and frame.image_hw == (720, 1280)
        assert np.abs(frame.image.astype(int) - reference.image).max() <= 1
