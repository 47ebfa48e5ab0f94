"""streamd.stages.decode and .decoder: streams[].hwaccel and decoder_threads, and frames as yuv420p planes.

Real files made with ffmpeg (tests/streamd/media.py) or, where ffmpeg cannot make them or is absent (the GPU
machine), with PyAV. Without a GPU, hwaccel cuda is tested through its fallback to the CPU; the gpu-marked
test at the end compares NVDEC's frames with the CPU decoder's.
"""

from __future__ import annotations

import enum
import logging
import subprocess
import sys
import types
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from av.codec.hwaccel import HWAccel, hwdevices_available
from pydantic import TypeAdapter

from streamd import hardware
from streamd.config import BackendConfig, SourceKind, StreamConfig
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
REPO = Path(__file__).parents[3]


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
    reason = "libnvcuvid.so.1" if "cuda" in hwdevices_available() else "was built without cuda"
    assert reason in line  # the probe's reason: this machine has no NVIDIA driver
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
    assert level == logging.INFO and "h264 on the CPU" in line and "(hwaccel auto: the NVIDIA driver's libnvcuvid.so.1" in line


def test_nvdec_is_tried_on_the_shared_context_then_on_its_own_then_the_cpu(clips, caplog, monkeypatch):
    """hwaccel_for's candidates are opened in order (the primary CUDA context inference uses, then a context of the
    stream's own), each failure falling through, and the CPU last; the GPU is the backend's (cuda_device)."""
    asked, opened = [], []
    candidates = (decoder.NvdecOpen("shared", decoder.PRIMARY_CONTEXT), decoder.NvdecOpen("own", decoder.OWN_CONTEXT))
    monkeypatch.setattr(decode_module, "hwaccel_for", lambda mode, device: (asked.append((mode, device)) or candidates, None))
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
    monkeypatch.setattr(decoder, "nvdec_problem", lambda device: None)  # as on a GPU machine whose probe passed
    candidates, why_not = decoder.hwaccel_for("auto", 1)
    assert why_not is None and all(isinstance(c.hwaccel, HWAccel) for c in candidates)
    assert [c.context for c in candidates] == [decoder.PRIMARY_CONTEXT, decoder.OWN_CONTEXT]
    made = []  # HWAccel keeps its settings to itself: record what it was built with
    monkeypatch.setattr(decoder, "HWAccel", lambda kind, **settings: made.append((kind, settings)) or kind)
    decoder.hwaccel_for("cuda", 1)
    assert made == [("cuda", {"device": "1", "allow_software_fallback": True, "options": {"primary_ctx": "1"}}),
                    ("cuda", {"device": "1", "allow_software_fallback": True})]  # fmt: skip
    assert decoder.hwaccel_for("none", 1) == ((), None)


# --- the NVDEC probe -----------------------------------------------------------------------------------


@pytest.fixture
def fresh_probe():
    """nvdec_problem probes once per process: forget its answers before and after the test."""
    decoder.nvdec_problem.cache_clear()
    yield decoder.nvdec_problem
    decoder.nvdec_problem.cache_clear()


def test_the_probe_names_a_missing_libnvcuvid_and_nvdec_is_not_tried(fresh_probe, monkeypatch, caplog, clips):
    """Without the driver's libnvcuvid.so.1 PyAV would fall back to the CPU silently: the probe says so first, and
    hwaccel_for offers no NVDEC open (the stream decodes on the CPU with that reason in its WARNING)."""
    monkeypatch.setattr(decoder, "hwdevices_available", lambda: ["cuda"])
    loaded = []

    def no_library(name):
        loaded.append(name)
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(decoder.ctypes, "CDLL", no_library)
    problem = fresh_probe(0)
    assert loaded == ["libnvcuvid.so.1"] and problem.startswith("the NVIDIA driver's libnvcuvid.so.1, which FFmpeg")
    assert "No such file" in problem
    assert decoder.hwaccel_for("cuda", 0) == ((), problem)
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    assert len(decode(clips["h264"], "cam-9", hwaccel="cuda")) == FRAMES
    ((level, line),) = decoder_lines(caplog)
    assert level == logging.WARNING and line.endswith(f"(hwaccel cuda: {problem})")


def test_the_probe_without_cuda_in_ffmpeg_says_so(fresh_probe, monkeypatch):
    monkeypatch.setattr(decoder, "hwdevices_available", lambda: ["vaapi"])
    assert fresh_probe(0) == f"this FFmpeg (PyAV {av.__version__}) was built without cuda"


@pytest.mark.skipif(GPU or "cuda" not in hwdevices_available(), reason="needs a cuda FFmpeg without a usable GPU")
def test_the_probe_opens_nvdec_once_and_keeps_ffmpegs_reason(fresh_probe, monkeypatch):
    """Past the library check (made to pass here), one real NVDEC open of a clip the probe encodes: without a
    driver it fails, and what FFmpeg logged (hidden by PyAV's default log callback) is in the reason."""
    monkeypatch.setattr(decoder.ctypes, "CDLL", lambda name: None)
    level = av.logging.get_level()
    problem = fresh_probe(0)
    assert problem.startswith("an NVDEC open of a 128x128 H.264 clip failed: ") and "(FFmpeg: " in problem
    assert fresh_probe(0) is problem  # once per process and device
    assert av.logging.get_level() == level  # the process's FFmpeg log level is restored


@pytest.mark.parametrize(
    "is_hwaccel, pix_fmt, nvdec, expected, why_not",
    [
        (True, "cuda", decoder.PRIMARY_CONTEXT, "h264 on NVDEC (cuda, the primary CUDA context, shared with inference)", None),
        (True, "cuda", decoder.OWN_CONTEXT, "h264 on NVDEC (cuda, a CUDA context of its own)", None),
        (True, "yuv420p", decoder.OWN_CONTEXT, "h264 on the CPU, 2 threads", "NVDEC did not take this h264 stream (64x48)"),
        (False, "yuv420p", decoder.PRIMARY_CONTEXT, "h264 on the CPU, 2 threads", "NVDEC has no h264 decoder"),
        (False, "yuv420p", None, "h264 on the CPU, 2 threads", None),
    ],
)  # fmt: skip
def test_each_stream_is_labelled_by_what_decoded_it_and_in_which_context(is_hwaccel, pix_fmt, nvdec, expected, why_not):
    """What the codec context says once a frame is out (is_hwaccel, its pixel format), not what was asked for."""
    codec = types.SimpleNamespace(name="h264", is_hwaccel=is_hwaccel, format=types.SimpleNamespace(name=pix_fmt),
                                  width=64, height=48, thread_count=2)  # fmt: skip
    opened = None if nvdec is None else decoder.NvdecOpen("hwaccel", nvdec)
    assert decoder.decoder_in_use(codec, opened, None) == (expected, why_not)


# --- the primary CUDA context NVDEC shares (streamd.hardware) ----------------------------------------------


class FakeDriver:
    """cuda-bindings' driver module as set_primary_context_blocking_sync calls it: (CUresult, *values) tuples, the
    primary context's flags and state, and every call recorded."""

    class CUresult(enum.Enum):
        CUDA_SUCCESS, CUDA_ERROR_NO_DEVICE = 0, 100

    class CUctx_flags(enum.IntEnum):
        CU_CTX_SCHED_BLOCKING_SYNC, CU_CTX_SCHED_MASK = 4, 7

    def __init__(self, flags: int = 0, active: bool = False, devices: int = 2):
        self.flags, self.active, self.devices, self.calls = flags, active, devices, []

    def cuInit(self, flags):
        self.calls.append(("cuInit", flags))
        return (self.CUresult.CUDA_SUCCESS,)

    def cuDeviceGet(self, ordinal):
        self.calls.append(("cuDeviceGet", ordinal))
        return (self.CUresult.CUDA_SUCCESS if ordinal < self.devices else self.CUresult.CUDA_ERROR_NO_DEVICE, ordinal)

    def cuDevicePrimaryCtxGetState(self, device):
        return self.CUresult.CUDA_SUCCESS, self.flags, int(self.active)

    def cuDevicePrimaryCtxSetFlags(self, device, flags):
        self.calls.append(("cuDevicePrimaryCtxSetFlags", device, flags))
        self.flags = flags
        return (self.CUresult.CUDA_SUCCESS,)


@pytest.fixture
def fake_driver(monkeypatch):
    driver = FakeDriver()
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(driver=driver))
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    return driver


def test_the_primary_context_is_set_to_blocking_sync_before_it_is_active(fake_driver):
    assert hardware.set_primary_context_blocking_sync(1) == (True, "CUDA device 1: primary context set to blocking sync, shared by inference and NVDEC")
    assert fake_driver.calls == [("cuInit", 0), ("cuDeviceGet", 1), ("cuDevicePrimaryCtxSetFlags", 1, 4)]


@pytest.mark.parametrize(
    "flags, active, devices, expected",
    [
        (0, True, 2, (False, "CUDA device 1: primary context already active with flags 0x0 (something used the GPU first): NVDEC streams will get CUDA contexts of their own")),
        (4, True, 2, (True, "CUDA device 1: primary context already active in blocking-sync mode")),
        (0, False, 1, (False, "CUDA device 1: primary context flags not set (RuntimeError: cuDeviceGet failed: CUDA_ERROR_NO_DEVICE)")),
    ],
)  # fmt: skip
def test_a_context_already_active_or_a_missing_device_is_said_and_left_alone(fake_driver, flags, active, devices, expected):
    fake_driver.flags, fake_driver.active, fake_driver.devices = flags, active, devices
    assert hardware.set_primary_context_blocking_sync(1) == expected
    assert not [call for call in fake_driver.calls if call[0] == "cuDevicePrimaryCtxSetFlags"]


def test_without_cuda_bindings_it_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails
    done, line = hardware.set_primary_context_blocking_sync(0)
    assert not done and line.startswith("cuda-bindings is not importable (") and "contexts of their own" in line


@pytest.mark.parametrize(
    "streams, backend, gpu",
    [
        ([{"hwaccel": "cuda"}], {"type": "torch", "device": "cuda:1"}, 1),
        ([{"hwaccel": "none"}, {"hwaccel": "cuda"}], {"type": "tensorrt", "device": 1}, 1),
        ([{"hwaccel": "cuda"}], {"type": "onnxruntime"}, 0),
        ([{"hwaccel": "none"}], {"type": "torch", "device": "cuda:1"}, None),
        ([{"hwaccel": "auto"}], {"type": "torch", "device": "cuda:0"}, None),  # no NVIDIA GPU here: auto is the CPU
    ],
)  # fmt: skip
def test_the_daemon_sets_the_backends_gpu_when_a_stream_may_decode_on_nvdec(monkeypatch, caplog, streams, backend, gpu):
    monkeypatch.setattr(hardware, "nvidia_gpu_present", lambda: False)
    asked = []
    monkeypatch.setattr(hardware, "set_primary_context_blocking_sync", lambda device: asked.append(device) or (False, "not here"))
    caplog.set_level(logging.INFO, logger="streamd.hardware")
    config = types.SimpleNamespace(streams=[types.SimpleNamespace(**stream) for stream in streams],
                                   backend=TypeAdapter(BackendConfig).validate_python(backend))  # fmt: skip
    hardware.prepare_primary_context(config)
    assert asked == ([] if gpu is None else [gpu])
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == ([] if gpu is None else [(logging.WARNING, "not here")])


# --- paced files and latency -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, thread_type", [({}, "AUTO"), ({"realtime": True}, "SLICE")])
def test_a_paced_file_decodes_with_slice_threads_as_live_sources_do(clips, fields, thread_type):
    """Frame threading holds a frame per thread inside the decoder (about 0.5 s at 16 threads, invisible in
    decode_ms): a file read at its frame rate stands for a live source and decodes as one."""
    config = StreamConfig.model_validate({"id": "cam-1", "source": str(clips["h264"]), **fields})
    assert open_source(config, Metrics(["cam-1"])).thread_type == thread_type


def test_each_frame_is_timed_from_its_own_packet(tmp_path, monkeypatch):
    """With B-frames and frame threads a frame comes out some packets after its own: its time is its own packet's
    (by pts), so decode_ms and the latency count the time it sat in the decoder. A fake clock numbers the packets."""
    images = [np.full((48, 64, 3), 9 * n, np.uint8) for n in range(20)]
    clip = media.encode_images(tmp_path / "b.mp4", images, options={"preset": "veryfast", "bf": "3", "g": "10"})
    with av.open(str(clip)) as container:
        arrival = {packet.pts: index for index, packet in enumerate(container.demux(video=0), 1) if packet.pts is not None}
    source = AVSource("cam-1", str(clip), kind=SourceKind.FILE, metrics=Metrics(["cam-1"]), decoder_threads=4)
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(decode_module, "time", types.SimpleNamespace(monotonic=lambda: float(next(ticks))))
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type, stream.codec_context.thread_count = "AUTO", 4
        timed = [(frame.pts, received) for frame, received in source._decode(container, stream)]
    assert len(timed) == 20 and len(arrival) == 20
    assert [received for _, received in timed] == [float(arrival[pts]) for pts, _ in timed]
    assert any(received < index for index, (_, received) in enumerate(timed, 1))  # some came out after later packets


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


# Why NVDEC cannot run here (the probe's reason, FFmpeg's own words included), or None; the gpu-marked tests skip with it.
NVDEC_PROBLEM = decoder.nvdec_problem(0) if GPU else "no NVIDIA GPU (no /dev/nvidia0)"
needs_nvdec = pytest.mark.skipif(NVDEC_PROBLEM is not None, reason=f"NVDEC cannot decode here: {NVDEC_PROBLEM}")


@pytest.mark.gpu
@needs_nvdec
@pytest.mark.parametrize("pixel_format", ["bgr24", "yuv420p"])
def test_nvdec_frames_equal_the_cpu_decoders(tmp_path, caplog, pixel_format):
    """H.264 decoding is exact by the standard, and nv12 -> yuv420p is a copy: NVDEC's frames are the CPU's
    within 1 grey level (expected: equal)."""
    clip = pyav_video(tmp_path / "720p.mp4", size=(1280, 720), frames=30)  # the GPU machine has no ffmpeg binary
    caplog.set_level(logging.INFO, logger=DECODE_LOG)
    on_gpu = decode(clip, "gpu-1", pixel_format=pixel_format, hwaccel="cuda")
    lines = [line for _, line in decoder_lines(caplog)]  # the context: the primary one if nothing used it before
    assert [line for line in lines if line.startswith("stream 'gpu-1': h264 on NVDEC (cuda, ")] == lines[:1], lines
    on_cpu = decode(clip, "cpu-1", pixel_format=pixel_format, hwaccel="none")
    assert len(on_gpu) == len(on_cpu) == 30
    for frame, reference in zip(on_gpu, on_cpu):
        assert frame.pixel_format == reference.pixel_format == pixel_format and frame.image_hw == (720, 1280)
        assert np.abs(frame.image.astype(int) - reference.image).max() <= 1


# The daemon's order, in a fresh process: the primary context's flags, then the backend's first CUDA allocation,
# then the streams open. Set, NVDEC shares the context; not set, FFmpeg refuses it and each stream makes its own.
CONTEXT_ORDER = """
import logging, sys
import torch
from streamd.hardware import set_primary_context_blocking_sync
from tests.streamd.stages.test_decode_hw import decode, pyav_video
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stdout)
if sys.argv[2] == "set":
    print(set_primary_context_blocking_sync(0))
torch.zeros(1, device="cuda:0")
decode(pyav_video(Path(sys.argv[1]), size=(320, 240), frames=5), "ctx-1", hwaccel="cuda")
"""


@pytest.mark.gpu
@needs_nvdec
@pytest.mark.parametrize("flags, context", [("set", "the primary CUDA context"), ("unset", "a CUDA context of its own")])
def test_nvdec_shares_the_primary_context_only_when_its_flags_were_set_before_the_backend(tmp_path, flags, context):
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", CONTEXT_ORDER, str(tmp_path / "c.mp4"), flags], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stream 'ctx-1': h264 on NVDEC (cuda, {context}" in result.stdout, result.stdout[-3000:]


def test_one_reformatter_for_a_stream_gives_to_ndarrays_pixels_whatever_comes(clips):
    """A stream's Reformatter keeps one swscale context (VideoFrame.to_ndarray makes one, with a thread per CPU,
    for every frame): it follows every change of size, pixel format and target a stream can show, bit for bit."""
    reformat = decoder.Reformatter()
    for clip in ("h264", "odd", "yuv422p", "mjpeg", "h264"):
        with av.open(str(clips[clip])) as container:
            av_frames = [frame for _, frame in zip(range(3), container.decode(video=0))]
        for av_frame in av_frames:
            for pixel_format, model_hw in (("bgr24", None), ("bgr24", (64, 64)), ("bgr24", (96, 48)), ("yuv420p", None)):
                got = decoder.frame_pixels(av_frame, pixel_format, model_hw, reformat)
                expected = decoder.frame_pixels(av_frame, pixel_format, model_hw)  # a new context of its own
                assert got[1:] == expected[1:]
                np.testing.assert_array_equal(got[0], expected[0])
                if model_hw is not None:
                    size = (got[0].shape[1], got[0].shape[0])
                    plain = av_frame.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA")
                    np.testing.assert_array_equal(got[0], plain)
