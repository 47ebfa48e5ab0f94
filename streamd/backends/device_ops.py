"""The GPU path's tensor work, on whatever device the tensors are on: grid decode, colour conversion, letterbox,
threshold + NMS.

Shared by the torch backend and the TensorRT backend (which runs its engine between letterbox_frames and
postprocess_on_device on the same device buffers). Every function here also runs on the CPU, where the tests
check them against what the CPU path does: PyAV's bgr24 decode and streamd.model.preprocess (both bit for bit),
streamd.model.postprocess (the same boxes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torchvision

from streamd.model.bundle import Preprocess
from streamd.model.detections import Detections
from streamd.types import BGR24, PixelLayout, image_problem, picture_hw


class GridDecode(torch.nn.Module):
    """YOLOX's grid decode with the grids of one input size held as buffers (no CPU work per call).

    forward: the head's raw [N, A, 5 + C] (obj and classes after the sigmoid) -> float32, with
    cx, cy = (raw + grid) * stride and w, h = exp(raw) * stride, in input pixels (YoloxHead.decode_outputs).
    """

    def __init__(self, input_hw: tuple[int, int], strides: Sequence[int]):
        super().__init__()
        grids, stride_rows = [], []
        for stride in strides:
            rows, cols = input_hw[0] // stride, input_hw[1] // stride
            y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            grids.append(torch.stack((x, y), 2).reshape(-1, 2))
            stride_rows.append(torch.full((rows * cols, 1), stride))
        self.register_buffer("grid", torch.cat(grids).float())
        self.register_buffer("stride", torch.cat(stride_rows).float())

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.float()
        xy = (raw[..., :2] + self.grid) * self.stride
        wh = torch.exp(raw[..., 2:4]) * self.stride
        return torch.cat((xy, wh, raw[..., 4:]), dim=-1)


# swscale's yuv420p -> bgr24 (what PyAV's to_ndarray(format="bgr24") gives on x86: libswscale/x86/yuv_2_rgb.asm):
# every sample is widened to 8 x (value - offset) and multiplied by a 13-bit coefficient with pmulhw (the product's
# top 16 bits, i.e. floored), the chroma of each 2x2 block used as it is (no interpolation). Its coefficients, per
# colorspace the frame is tagged with (untagged: bt601), from ff_yuv2rgb_coeffs (V->R, U->B, U->G, V->G in
# 1/65536, for limited range) as ff_yuv2rgb_c_init_tables scales them for the range and rounds them to 1/8192.
_SWSCALE_COEFFS = {"bt601": (104597, 132201, 25675, 53279), "bt709": (117489, 138438, 13975, 34925),
                   "bt2020": (110013, 140363, 12277, 42626)}  # fmt: skip
COLORSPACES = tuple(_SWSCALE_COEFFS)


def _yuv_coefficients(colorspace: str, full_range: bool) -> tuple[int, int, int, int, int, int]:
    """swscale's 13-bit Y, V->R, U->B, U->G, V->G multipliers and its luma offset (x 8)."""
    if colorspace not in _SWSCALE_COEFFS:
        raise ValueError(f"unknown colorspace {colorspace!r} ({' | '.join(COLORSPACES)})")
    chroma = _SWSCALE_COEFFS[colorspace]
    if full_range:  # Y as it is; chroma x 224/255, truncated as C's integer division does
        luma, offset, chroma = 1 << 16, 0, tuple(c * 224 // 255 for c in chroma)
    else:  # Y 16..235 -> 0..255
        luma, offset = (1 << 16) * 255 // 219, 16 * 8
    v_r, u_b, u_g, v_g = chroma
    return *((c * 8192 + 32768) >> 16 for c in (luma, v_r, u_b, -u_g, -v_g)), offset


def yuv420p_to_bgr(planes: torch.Tensor, colorspace: str = "bt601", full_range: bool = False) -> torch.Tensor:
    """uint8 [n, H * 3 / 2, W] yuv420p planes (PyAV's to_ndarray layout) -> uint8 [n, H, W, 3] BGR, as a bgr24 decode
    (a view of planar [n, 3, H, W] memory: what the letterbox wants).

    Equal, bit for bit, to swscale's bgr24 on x86 for the colorspace and range the frames are tagged with
    (tests/streamd/backends/test_device_ops.py); swscale's C path (no SIMD: ffmpeg -cpuflags 0) differs from it by
    0.66 grey levels on average, 3 at most. Converting at full size, then resizing, is what keeps it exact:
    resizing the planes first and converting in float (cheaper) was measured at mean 0.1-0.26, max 33 grey levels
    off (saturated colours clip before the resize in swscale).
    """
    y_scale, v_r, u_b, u_g, v_g, y_offset = _yuv_coefficients(colorspace, full_range)
    count, rows, width = planes.shape
    height = rows * 2 // 3
    chroma = planes[:, height:].reshape(count, 2, height // 2, width // 2)  # U then V, each stored row after row
    y = planes[:, :height].int().mul_(8).sub_(y_offset).mul_(y_scale).bitwise_right_shift_(16)
    u, v = chroma.int().mul_(8).sub_(1024).unbind(1)
    b, r = (u * u_b) >> 16, (v * v_r) >> 16
    g = ((u * u_g) >> 16) + ((v * v_g) >> 16)
    # Planar, each chroma sample over its 2x2 block: widened along rows here, broadcast down the block's 2 rows.
    chroma_bgr = torch.stack((b, g, r), 1).repeat_interleave(2, dim=-1).view(count, 3, height // 2, 1, width)
    pixels = y.view(count, 1, height // 2, 2, width) + chroma_bgr
    return pixels.clamp_(0, 255).to(torch.uint8).view(count, 3, height, width).permute(0, 2, 3, 1)


def _linear_taps(src: int, dst: int, clamp: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """OpenCV's INTER_LINEAR taps along one axis: source indices i0, i1 (int64 [dst]) and 11-bit weights w0, w1 (int32).

    As cv::resize computes them: the position (d + 0.5) / (dst / src) - 0.5 in double, cast to float; each weight
    rounded to 1/2048 on its own. Columns (clamp) past an edge take the edge pixel with weight 1; rows keep their
    weights and read the edge row twice (a border replicate), which rounds differently in the vertical pass.
    """
    position = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * (1.0 / (dst / src)) - 0.5).float()
    first = position.floor()
    fraction, first = position - first, first.long()
    if clamp:
        outside = (first < 0) | (first >= src - 1)
        fraction = torch.where(outside, torch.zeros_like(fraction), fraction)
    weights = (((1 - fraction) * 2048).round().int(), (fraction * 2048).round().int())
    return first.clamp(0, src - 1), (first + 1).clamp(0, src - 1), *weights


def resize_linear(images: torch.Tensor, new_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, C, H, W] -> uint8 [n, C, h, w]: OpenCV's cv2.resize INTER_LINEAR on uint8, bit for bit.

    OpenCV works in fixed point: the horizontal pass sums the two columns times their 11-bit weights (exact, int32);
    the vertical pass (its SIMD path, VResizeLinearVec_32s8u) drops 4 bits of each row, keeps the top 16 bits of
    its product with the row's weight, adds the two and rounds away the last 2 bits. A float bilinear resize
    rounded to whole levels differs from it by one level at ~10% of pixels, which moves boxes (IoU 0.93 seen).
    An exact 2x downscale, which OpenCV hands to INTER_AREA, gives the same (a + b + c + d + 2) >> 2 here.
    """
    height, width = images.shape[2:4]
    col0, col1, cw0, cw1 = _linear_taps(width, new_hw[1], True, images.device)
    row0, row1, rw0, rw1 = _linear_taps(height, new_hw[0], False, images.device)
    out = None
    for rows, row_weight in ((row0, rw0), (row1, rw1)):
        picked = images.index_select(2, rows)  # only the rows this tap reads: the horizontal pass then runs on h rows
        horizontal = picked.index_select(3, col0).int() * cw0 + picked.index_select(3, col1).int() * cw1
        term = ((horizontal >> 4) * row_weight[:, None]) >> 16
        out = term if out is None else out.add_(term)
    return out.add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


def letterbox_frames(
    frames: Sequence[torch.Tensor],
    input_hw: tuple[int, int],
    preprocess: Preprocess,
    out: torch.Tensor,
    layouts: Sequence[PixelLayout] | None = None,
) -> list[float]:
    """Letterbox uint8 frames (on out's device) into out[:n], float32 [n, 3, H, W]; their scales.

    layouts[i] (default all BGR24): "bgr24" HxWx3, or "yuv420p" [H * 3 / 2, W] planes converted to BGR first as
    swscale does (yuv420p_to_bgr) for the matrix the frame is tagged with (a BT.709 frame read as BT.601 is off by
    up to 34 grey levels) and its range (full-range planes scaled to limited range on the CPU first were 3 grey
    levels off: 12% of BCCD boxes fell below IoU 0.98), so a frame letterboxes the same whichever way it was
    decoded. streamd.model.preprocess.letterbox on the device, bit for bit: resize by r = min(H/h, W/w) with
    OpenCV's uint8 INTER_LINEAR arithmetic (resize_linear), top-left on a pad_value canvas, then channel order,
    mean/std and scale. Frames of the same size and layout are converted and resized in one call.
    """
    height, width = input_hw
    layouts = [BGR24] * len(frames) if layouts is None else list(layouts)
    if len(layouts) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(layouts)} layouts")
    out[: len(frames)].fill_(preprocess.pad_value)
    groups: dict[tuple[PixelLayout, int, int], list[int]] = defaultdict(list)
    for index, (frame, layout) in enumerate(zip(frames, layouts)):
        if problem := image_problem(frame, layout.format, frame.dtype == torch.uint8):
            raise ValueError(problem)
        key = layout if layout.format == "yuv420p" else BGR24  # a bgr24 frame has no matrix or range
        groups[(key, *picture_hw(frame, layout.format))].append(index)
    scales = [0.0] * len(frames)
    for (layout, frame_h, frame_w), indices in groups.items():
        scale = min(height / frame_h, width / frame_w)
        new_h, new_w = int(frame_h * scale), int(frame_w * scale)
        images = torch.stack([frames[i] for i in indices])
        if layout.format == "yuv420p":
            images = yuv420p_to_bgr(images, layout.colorspace, layout.full_range)
        images = images.permute(0, 3, 1, 2)  # planar: a view (of yuv420p_to_bgr's planar result: contiguous)
        if (new_h, new_w) != (frame_h, frame_w):
            images = resize_linear(images, (new_h, new_w))
        if preprocess.channel_order == "rgb":
            images = images.flip(1)
        for row, index in enumerate(indices):
            out[index, :, :new_h, :new_w] = images[row]
            scales[index] = scale
    if preprocess.mean is not None or preprocess.std is not None or preprocess.scale != 1.0:
        # Channel by channel: a torch.tensor(mean) made here would be a host-to-device copy, which waits for the
        # stream (pageable memory). The divisor is a 0-dim tensor filled on the device, not a Python scalar: CUDA's
        # true division by a CPU scalar multiplies by its reciprocal (up to 1 ulp off the host's float32 division).
        mean, std = preprocess.mean or (0.0, 0.0, 0.0), preprocess.std or (1.0, 1.0, 1.0)
        for channel in range(3):
            plane = out[: len(frames), channel]
            divisor = torch.full((), std[channel], dtype=out.dtype, device=out.device)
            plane.sub_(mean[channel]).div_(divisor).mul_(preprocess.scale)
    return scales


def postprocess_on_device(
    output: torch.Tensor,
    scales: Sequence[float],
    source_hw: Sequence[tuple[int, int]],
    conf_threshold: float,
    iou_threshold: float,
) -> list[Detections]:
    """streamd.model.postprocess on the device: float32 [N, A, 5 + C] -> N Detections in source pixels.

    scales[i]: input pixels per source pixel of frame i (its letterbox scale times any prescale); source_hw[i]:
    the source's (H, W), to clip to. score = objectness x best class score, kept when >= conf_threshold; rows
    streamd.model.postprocess drops as invalid (non-finite, no area before or after clipping) are dropped here too;
    class-aware NMS per frame in one torchvision batched_nms call (the group of a box is frame * C + class).
    The kept rows come to the host in one copy; dividing by the scale and clipping happen there, in float32
    as streamd.model.postprocess does them (a few boxes, and no host-to-device copy of the scales).

    The host waits for the device twice before that copy, where torch cannot do otherwise: at torch.nonzero
    (its output's size depends on the data) and in torchvision's nms (its CUDA kernel copies the suppression
    mask to the host). batched_nms runs one nms over boxes offset per group up to 100,000 coordinates (25,000
    boxes) on CUDA and 4,000 (1,000 boxes) on the CPU (torchvision >= 0.22; before, 20,000 on CUDA), and above
    that one nms per group of torch.unique, each waited for.
    """
    if output.ndim != 3 or output.shape[2] < 6:
        raise ValueError(f"expected model output [N, A, 5 + C], got shape {tuple(output.shape)}")
    count, num_classes = output.shape[0], output.shape[2] - 5
    if len(scales) != count or len(source_hw) != count:
        raise ValueError(f"{count} outputs but {len(scales)} scales and {len(source_hw)} source sizes")
    class_score, class_id = output[..., 5:].max(dim=-1)
    confidence = output[..., 4] * class_score
    cxcywh = output[..., :4]
    boxes = torch.cat((cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2), dim=-1)
    # What streamd.model.postprocess drops as invalid (a non-finite value in the row or the box, no area), folded
    # into the one mask so that torch.nonzero stays the only wait here.
    valid = torch.isfinite(output).all(dim=-1) & torch.isfinite(boxes).all(dim=-1) & _has_area(boxes)
    frame, anchor = torch.nonzero(valid & (confidence >= conf_threshold), as_tuple=True)
    xyxy, score, label = boxes[frame, anchor], confidence[frame, anchor], class_id[frame, anchor]
    # In float64: batched_nms shifts each group by group x (largest coordinate + 1); with 16 frames x 80 classes
    # that is ~500,000, where float32 keeps 1/16 of a pixel and IoUs near the threshold would flip.
    keep = torchvision.ops.batched_nms(xyxy.double(), score.double(), frame * num_classes + label, iou_threshold)
    kept = torch.cat((xyxy[keep], score[keep, None], label[keep, None].float(), frame[keep, None].float()), dim=1)
    rows = kept.cpu().numpy()  # [K, 7]: x1 y1 x2 y2 score class frame (ids exact in float32 below 2**24)
    results = []
    for index in range(count):
        mine = rows[rows[:, 6] == index]
        xyxy_np = mine[:, :4] / np.float32(scales[index])
        height, width = source_hw[index]
        np.clip(xyxy_np[:, 0::2], 0, width, out=xyxy_np[:, 0::2])
        np.clip(xyxy_np[:, 1::2], 0, height, out=xyxy_np[:, 1::2])
        inside = _has_area(xyxy_np)  # a box wholly outside the frame is clipped to nothing, as on the host
        results.append(Detections(xyxy_np[inside], mine[inside, 4], mine[inside, 5].astype(np.int64)))
    return results


def _has_area(xyxy):
    """bool [...]: the xyxy boxes [..., 4] (a tensor or an array) whose width and height are both > 0."""
    return (xyxy[..., 2] > xyxy[..., 0]) & (xyxy[..., 3] > xyxy[..., 1])
