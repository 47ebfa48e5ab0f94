"""The decoder of a source (streamd.stages.decode): NVDEC or the CPU, and the pixels each Frame carries.

streams[].hwaccel:
    cuda   NVDEC through PyAV's hwaccel; FFmpeg downloads each frame to host memory (nv12 for 8-bit 4:2:0).
           When it does not open (no device, no driver, an FFmpeg built without CUDA) the stream is decoded
           on the CPU, and a WARNING names the stream and says why.
    auto   cuda when an NVIDIA GPU is present (the driver's device nodes, as streamd.backends.select checks),
           else the CPU without a word.
    none   the CPU.
A stream NVDEC cannot decode (its codec, profile or size) goes on in FFmpeg's CPU decoder
(allow_software_fallback); so which decoder a stream really got is read from the codec context once its
first frame is out (`decoder_in_use`).

Pixels (`frame_pixels`): "bgr24" uint8 [H, W, 3], or scaled to the model's letterbox size in the same swscale
pass; "yuv420p" the planes as decoded with the colour matrix and range the frame is tagged with
(streamd.types.PixelLayout), which streamd.backends.device_ops converts bit for bit as swscale does,
reformatted by swscale when the decoder gives another layout (nv12 from NVDEC, yuv422p ...). A frame of odd
width or height, or tagged with a matrix the device does not convert, goes out as bgr24. NVDEC's nv12 is deinterleaved to yuv420p first, so its pixels are the CPU decoder's to the bit:
swscale's own nv12 -> bgr24 interpolates chroma (measured up to 216 levels off at sharp colour edges) and
takes 3x as long.
"""

from __future__ import annotations

import av
import numpy as np
from av.codec.hwaccel import HWAccel, hwdevices_available
from av.video.reformatter import ColorRange

from streamd.hardware import nvidia_gpu_present
from streamd.types import BGR24, Colorspace, PixelFormat, PixelLayout

PIXEL_FORMATS: tuple[PixelFormat, ...] = ("bgr24", "yuv420p")
_CUDA_PIXEL_FORMAT = "cuda"  # what the codec context's pix_fmt is while NVDEC decodes (frames stay on the device)


def hwaccel_for(mode: str, cuda_device: int = 0) -> tuple[tuple[HWAccel, ...], str | None]:
    """The HWAccels to try, in order, to open a stream with (none: the CPU) and, when hardware decoding is wanted
    but will not be tried, why not. mode: streams[].hwaccel; cuda_device: the GPU the backend runs on.

    First on the device's primary CUDA context, the one PyTorch uses: every stream's NVDEC then shares one
    context with inference (contexts time-slice the GPU, and each holds its own memory). FFmpeg refuses the
    primary context when it is already active with other flags than its own, so the second try creates a
    context of the stream's own. Codecs without an NVDEC decoder are decoded on the CPU rather than refused.
    """
    if mode == "none" or (mode == "auto" and not nvidia_gpu_present()):
        return (), None
    if "cuda" not in hwdevices_available():
        return (), f"this FFmpeg (PyAV {av.__version__}) was built without cuda"
    device = str(cuda_device)
    shared = HWAccel("cuda", device=device, allow_software_fallback=True, options={"primary_ctx": "1"})
    return (shared, HWAccel("cuda", device=device, allow_software_fallback=True)), None


def decoder_in_use(codec_context: av.VideoCodecContext, tried: bool, why_not: str | None) -> tuple[str, str | None]:
    """("h264 on NVDEC (cuda)" | "h264 on the CPU, 3 threads", why not NVDEC or None) once a frame is out.

    tried: the container was opened with a HWAccel. The thread count is the codec's own once it is open
    (FFmpeg's choice when none was set).
    """
    name = codec_context.name
    if tried:
        if not codec_context.is_hwaccel:
            why_not = f"NVDEC has no {name} decoder"
        elif codec_context.format is not None and codec_context.format.name == _CUDA_PIXEL_FORMAT:
            return f"{name} on NVDEC (cuda)", None
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
    av_frame: av.VideoFrame, pixel_format: PixelFormat, model_hw: tuple[int, int] | None
) -> tuple[np.ndarray, PixelLayout, tuple[int, int] | None, float]:
    """(image, its layout, source (H, W) when scaled else None, scale) of a decoded frame.

    yuv420p: the planes as decoded, uint8 [H * 3 / 2, W], with the colour matrix and range the frame is tagged
    with, so that the device converts them exactly as swscale would (odd H or W, or a matrix the device does
    not convert: bgr24 instead). model_hw: a BGR image scaled to the letterbox's own size (int(h * r), int(w * r)),
    r = min(H / h, W / w), when r < 1, so that the letterbox only pads it. model_hw and yuv420p exclude each
    other (AVSource refuses both).
    """
    if av_frame.format.name == "nv12":
        av_frame = av_frame.reformat(format="yuv420p")  # keeps its colour range and matrix tags
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
            image = av_frame.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA")
            return image, BGR24, (height, width), scale
    return av_frame.to_ndarray(format="bgr24"), BGR24, None, 1.0
