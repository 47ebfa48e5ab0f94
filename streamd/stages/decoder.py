"""The decoder of a source (streamd.stages.decode): NVDEC or the CPU, and the pixels each Frame carries.

streams[].hwaccel:
    cuda   NVDEC through PyAV's hwaccel; FFmpeg downloads each frame to host memory (nv12 for 8-bit 4:2:0).
           When it does not open (no device, no driver, an FFmpeg built without CUDA) the stream is decoded
           on the CPU, and a WARNING names the stream and says why. Probed once per GPU first
           (`nvdec_problem`): FFmpeg needs the driver's libnvcuvid.so.1, and without it PyAV would fall back
           to the CPU silently (its log callback hides FFmpeg's reason).
    auto   cuda when an NVIDIA GPU is present (the driver's device nodes, as streamd.backends.select checks),
           else the CPU without a word.
    none   the CPU.
A stream NVDEC cannot decode (its codec, profile or size) goes on in FFmpeg's CPU decoder
(allow_software_fallback); so which decoder a stream really got is read from the codec context once its
first frame is out (`decoder_in_use`), with the CUDA context it decodes in.

Pixels (`frame_pixels`): "bgr24" uint8 [H, W, 3], or scaled to the model's letterbox size in the same swscale
pass; "yuv420p" the planes as decoded with the colour matrix and range the frame is tagged with
(streamd.types.PixelLayout), which streamd.backends.device_ops converts bit for bit as swscale does,
reformatted by swscale when the decoder gives another layout (nv12 from NVDEC, yuv422p ...). A frame of odd
width or height, or tagged with a matrix the device does not convert, goes out as bgr24. NVDEC's nv12 is deinterleaved to yuv420p first, so its pixels are the CPU decoder's to the bit:
swscale's own nv12 -> bgr24 interpolates chroma (measured up to 216 levels off at sharp colour edges) and
takes 3x as long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
from dataclasses import dataclass
from functools import cache

import av
import av.logging
import numpy as np
from av.codec.hwaccel import HWAccel, hwdevices_available
from av.video.reformatter import ColorRange, VideoReformatter

from streamd.hardware import nvidia_gpu_present
from streamd.types import BGR24, Colorspace, PixelFormat, PixelLayout

PIXEL_FORMATS: tuple[PixelFormat, ...] = ("bgr24", "yuv420p")
_CUDA_PIXEL_FORMAT = "cuda"  # what the codec context's pix_fmt is while NVDEC decodes (frames stay on the device)


@dataclass(frozen=True, slots=True)
class NvdecOpen:
    """One way to open a stream on NVDEC: the HWAccel, and the CUDA context it decodes in (named in the log)."""

    hwaccel: HWAccel
    context: str


PRIMARY_CONTEXT = "the primary CUDA context, shared with inference"
OWN_CONTEXT = "a CUDA context of its own"
NVCUVID = "libnvcuvid.so.1"
_PROBE_HW = (128, 128)  # the probe clip's size: above NVDEC's H.264 minimum


def hwaccel_for(mode: str, cuda_device: int = 0) -> tuple[tuple[NvdecOpen, ...], str | None]:
    """The NVDEC opens to try, in order, to open a stream with (none: the CPU) and, when hardware decoding is
    wanted but will not be tried, why not. mode: streams[].hwaccel; cuda_device: the GPU the backend runs on.

    First on the device's primary CUDA context, the one PyTorch uses: every stream's NVDEC then shares one
    context with inference (contexts time-slice the GPU, and each holds its own memory). FFmpeg takes the
    primary context only in blocking-sync mode, which streamd.hardware.set_primary_context_blocking_sync sets
    before the backend makes it active; otherwise the second try creates a context of the stream's own. Codecs
    without an NVDEC decoder are decoded on the CPU rather than refused. NVDEC is not tried when
    `nvdec_problem` finds it cannot work here.
    """
    if mode == "none" or (mode == "auto" and not nvidia_gpu_present()):
        return (), None
    if (problem := nvdec_problem(cuda_device)) is not None:
        return (), problem
    device = str(cuda_device)
    shared = HWAccel("cuda", device=device, allow_software_fallback=True, options={"primary_ctx": "1"})
    own = HWAccel("cuda", device=device, allow_software_fallback=True)
    return (NvdecOpen(shared, PRIMARY_CONTEXT), NvdecOpen(own, OWN_CONTEXT)), None


@cache
def nvdec_problem(cuda_device: int = 0) -> str | None:
    """Why NVDEC cannot decode on this GPU, or None; probed once per device and process.

    In order: an FFmpeg built with cuda, the driver's libnvcuvid.so.1 loadable (ctypes; a container started
    without the driver's video capability lacks it), then one NVDEC open and decode of a small H.264 clip made
    here, on a context of the probe's own, with FFmpeg's log captured (av.logging) so its reason is kept.
    """
    if "cuda" not in hwdevices_available():
        return f"this FFmpeg (PyAV {av.__version__}) was built without cuda"
    try:
        ctypes.CDLL(NVCUVID)
    except OSError as exc:
        found = ctypes.util.find_library("nvcuvid")
        return (f"the NVIDIA driver's {NVCUVID}, which FFmpeg's NVDEC needs, does not load ({exc}; "
                f"{'found: ' + found if found else 'not on the library path'})")  # fmt: skip
    clip = _probe_clip()
    level = av.logging.get_level()
    av.logging.set_level(av.logging.VERBOSE)
    try:
        with av.logging.Capture(local=False) as logs:
            problem = _probe_decode(clip, cuda_device)
    finally:
        av.logging.set_level(level)
    if problem is None:
        return None
    said = "; ".join(f"{name}: {message.strip()}" for level, name, message in logs if level <= av.logging.WARNING)
    return f"{problem}" + (f" (FFmpeg: {said[:400]})" if said else " (FFmpeg said nothing)")


def _probe_clip() -> bytes:
    """Four frames of H.264 (libx264), 128x128, in an MP4 in memory."""
    buffer = io.BytesIO()
    height, width = _PROBE_HW
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(4):
            image = np.full((height, width, 3), 40 * index, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _probe_decode(clip: bytes, cuda_device: int) -> str | None:
    """Decode `clip` on NVDEC without a CPU fallback: None when its frames came from the device, else why not."""
    hwaccel = HWAccel("cuda", device=str(cuda_device), allow_software_fallback=False)
    try:
        with av.open(io.BytesIO(clip), hwaccel=hwaccel) as container:
            frames = list(container.decode(video=0))
            codec = container.streams.video[0].codec_context
            if not frames:
                return "an NVDEC open of a 128x128 H.264 clip gave no frame"
            if not codec.is_hwaccel:
                return "an NVDEC open of a 128x128 H.264 clip decoded on the CPU"
    except (av.error.FFmpegError, OSError) as exc:
        return f"an NVDEC open of a 128x128 H.264 clip failed: {exc}"
    return None


def decoder_in_use(codec_context: av.VideoCodecContext, nvdec: NvdecOpen | None, why_not: str | None) -> tuple[str, str | None]:
    """("h264 on NVDEC (cuda, <its context>)" | "h264 on the CPU, 3 threads", why not NVDEC or None) once a frame
    is out, as the codec context says (`is_hwaccel`, its pixel format).

    nvdec: how the container was opened (None: without a HWAccel). The thread count is the codec's own once it
    is open (FFmpeg's choice when none was set).
    """
    name = codec_context.name
    if nvdec is not None:
        if not codec_context.is_hwaccel:
            why_not = f"NVDEC has no {name} decoder"
        elif codec_context.format is not None and codec_context.format.name == _CUDA_PIXEL_FORMAT:
            return f"{name} on NVDEC (cuda, {nvdec.context})", None
        else:  # FFmpeg's get_format fell back to the CPU pixel format: the device refused this stream
            why_not = f"NVDEC did not take this {name} stream ({codec_context.width}x{codec_context.height})"
    threads = codec_context.thread_count
    return f"{name} on the CPU, {threads} thread{'s' if threads != 1 else ''}", why_not


# PyAV's VideoFrame.colorspace (FFmpeg's AVColorSpace) -> the matrix swscale converts with. RGB (0), unspecified
# (2), BT.470BG (5) and SMPTE 170M (6) are BT.601, swscale's default. FCC (4) and SMPTE 240M (7) have their own
# matrices and no device conversion here: such frames come as bgr24. swscale refuses YCgCo (8) and 10-14 (BT.2020
# CL, SMPTE 2085, chroma-derived, ICtCp: "Operation not supported", which would fail every frame of the stream):
# they are converted as BT.2020 NCL (10) or BT.601 (the rest), the nearest matrices it has.
_COLORSPACES: dict[int, Colorspace] = {1: "bt709", 9: "bt2020"}
_NO_DEVICE_CONVERSION = {4, 7}
_SWSCALE_CONVERTS = {0, 1, 2, 4, 5, 6, 7, 9}


def frame_pixels(
    av_frame: av.VideoFrame, pixel_format: PixelFormat, model_hw: tuple[int, int] | None,
    reformatter: Reformatter | None = None,
) -> tuple[np.ndarray, PixelLayout, tuple[int, int] | None, float]:
    """(image, its layout, source (H, W) when scaled else None, scale) of a decoded frame.

    yuv420p: the planes as decoded, uint8 [H * 3 / 2, W], with the colour matrix and range the frame is tagged
    with, so that the device converts them exactly as swscale would (odd H or W, or a matrix the device does
    not convert: bgr24 instead). model_hw: a BGR image scaled to the letterbox's own size (int(h * r), int(w * r)),
    r = min(H / h, W / w), when r < 1, so that the letterbox only pads it. model_hw and yuv420p exclude each
    other (AVSource refuses both).
    reformatter: the stream's own (`Reformatter`), so that its swscale context is made once, not per frame (a
    throwaway one per call, as VideoFrame.to_ndarray does); None: a new one for this frame.
    """
    convert = reformatter or Reformatter()
    if av_frame.format.name == "nv12":
        av_frame = convert(av_frame, format="yuv420p")  # keeps its colour range and matrix tags
    height, width = av_frame.height, av_frame.width
    if int(av_frame.colorspace) not in _SWSCALE_CONVERTS:
        av_frame.colorspace = 9 if int(av_frame.colorspace) == 10 else 2
    colorspace = int(av_frame.colorspace)
    if pixel_format == "yuv420p" and height % 2 == 0 and width % 2 == 0 and colorspace not in _NO_DEVICE_CONVERSION:
        if av_frame.format.name.startswith("yuvj") and av_frame.color_range != ColorRange.JPEG:
            # yuvj is full range by definition; untagged, to_ndarray would rescale it to limited range, and the
            # device would then expand it once more.
            av_frame.color_range = ColorRange.JPEG
        full_range = av_frame.color_range == ColorRange.JPEG
        layout = PixelLayout("yuv420p", _COLORSPACES.get(colorspace, "bt601"), full_range)
        return av_frame.to_ndarray(format="yuv420p"), layout, None, 1.0
    if model_hw is not None:
        scale = min(model_hw[0] / height, model_hw[1] / width)
        if scale < 1.0:
            size = (int(width * scale), int(height * scale))
            image = convert(av_frame, width=size[0], height=size[1], format="bgr24", interpolation="AREA").to_ndarray()
            return image, BGR24, (height, width), scale
    return convert(av_frame, format="bgr24").to_ndarray(), BGR24, None, 1.0


class Reformatter:
    """A stream's swscale conversions, in its source thread: one cached swscale context (VideoReformatter), one
    thread. VideoFrame.to_ndarray(format=..., width=...) makes a new context per frame with threads=0 (auto: one
    per CPU), so that each 1080p frame converted started and ended 2 threads on a 2-core machine and built the
    scaler's filter tables again (measured: 1.9 ms against 1.3 ms a frame for bgr24 at 416x234, quiet, and 240
    threads a second for four 1080p30 streams); the pixels are the same to the bit."""

    def __init__(self) -> None:
        self._reformatter = VideoReformatter()

    def __call__(self, av_frame: av.VideoFrame, **kwargs) -> av.VideoFrame:
        """av_frame converted (format, width, height, interpolation as VideoFrame.reformat takes them)."""
        return self._reformatter.reformat(av_frame, threads=1, **kwargs)
