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
pass; "yuv420p" the planes as a device backend wants them (streamd.types.PixelFormat: limited range, as
streamd.backends.device_ops converts them), reformatted by swscale when the decoder gives another layout
(nv12 from NVDEC, yuvj420p, yuv422p ...). A frame of odd width or height has no yuv420p layout and goes out
as bgr24. NVDEC's nv12 is deinterleaved to yuv420p first, so its pixels are the CPU decoder's to the bit:
swscale's own nv12 -> bgr24 interpolates chroma (measured up to 216 levels off at sharp colour edges) and
takes 3x as long.
"""

from __future__ import annotations

import av
import numpy as np
from av.codec.hwaccel import HWAccel, hwdevices_available
from av.video.reformatter import ColorRange

from streamd.hardware import nvidia_gpu_present
from streamd.types import PixelFormat

PIXEL_FORMATS: tuple[PixelFormat, ...] = ("bgr24", "yuv420p")
_CUDA_PIXEL_FORMAT = "cuda"  # what the codec context's pix_fmt is while NVDEC decodes (frames stay on the device)


def hwaccel_for(mode: str) -> tuple[HWAccel | None, str | None]:
    """The HWAccel to open a stream with (None: the CPU) and, when hardware decoding is wanted but will not be
    tried, why not. mode: streams[].hwaccel."""
    if mode == "none" or (mode == "auto" and not nvidia_gpu_present()):
        return None, None
    if "cuda" not in hwdevices_available():
        return None, f"this FFmpeg (PyAV {av.__version__}) was built without cuda"
    # Codecs without an NVDEC decoder are decoded on the CPU rather than refused.
    return HWAccel("cuda", allow_software_fallback=True), None


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


def frame_pixels(
    av_frame: av.VideoFrame, pixel_format: PixelFormat, model_hw: tuple[int, int] | None
) -> tuple[np.ndarray, PixelFormat, tuple[int, int] | None, float]:
    """(image, its pixel format, source (H, W) when scaled else None, scale) of a decoded frame.

    yuv420p: the planes, uint8 [H * 3 / 2, W] (odd H or W: bgr24 instead). model_hw: a BGR image scaled to the
    letterbox's own size (int(h * r), int(w * r)), r = min(H / h, W / w), when r < 1, so that the letterbox only
    pads it. model_hw and yuv420p exclude each other (AVSource refuses both).
    """
    if av_frame.format.name == "nv12":
        av_frame = av_frame.reformat(format="yuv420p")  # keeps its colour range and matrix tags
    height, width = av_frame.height, av_frame.width
    if pixel_format == "yuv420p" and height % 2 == 0 and width % 2 == 0:
        # Full range (yuvj420p, a full-range stream's nv12) is scaled to limited range; a limited frame is copied
        # as it is (asking swscale for limited range anyway would cost a pass).
        full_range = av_frame.color_range == ColorRange.JPEG or av_frame.format.name.startswith("yuvj")
        planes = av_frame.to_ndarray(format="yuv420p", **({"dst_color_range": ColorRange.MPEG} if full_range else {}))
        return planes, "yuv420p", None, 1.0
    if model_hw is not None:
        scale = min(model_hw[0] / height, model_hw[1] / width)
        if scale < 1.0:
            size = (int(width * scale), int(height * scale))
            image = av_frame.to_ndarray(width=size[0], height=size[1], format="bgr24", interpolation="AREA")
            return image, "bgr24", (height, width), scale
    return av_frame.to_ndarray(format="bgr24"), "bgr24", None, 1.0
