"""The GPU path's tensor work, on whatever device the tensors are on: grid decode, letterbox, threshold + NMS.

Shared by the torch backend and the TensorRT backend (which runs its engine between letterbox_frames and
postprocess_on_device on the same device buffers). Every function here also runs on the CPU, where the tests
check them against streamd.model.preprocess / postprocess.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision

from streamd.model.bundle import Preprocess
from streamd.model.detections import Detections


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
# top 16 bits, i.e. floored), the chroma of each 2x2 block used as it is (no interpolation). The coefficients are
# its ff_yuv2rgb_c_init_tables for BT.601 limited range (the default for an untagged frame), rounded to 1/8192:
# Y 255/219, V->R 1.402 x 255/224, U->B 1.772 x 255/224, U->G -0.344 x 255/224, V->G -0.714 x 255/224.
_YUV_Y, _YUV_VR, _YUV_UB, _YUV_UG, _YUV_VG = 9539, 13075, 16525, -3209, -6660


def yuv420p_to_bgr(planes: torch.Tensor) -> torch.Tensor:
    """uint8 [n, H * 3 / 2, W] yuv420p planes (PyAV's to_ndarray layout) -> float32 [n, 3, H, W] BGR, whole grey levels.

    Equal to swscale's bgr24 on x86 for BT.601 limited range, bit for bit (tests/streamd/backends/test_device_ops.py).
    """
    count, rows, width = planes.shape
    height = rows * 2 // 3
    chroma = planes[:, height:].reshape(count, 2, height // 2, width // 2)  # U then V, each stored row after row
    y = ((planes[:, :height].int() * 8 - 128) * _YUV_Y) >> 16
    u, v = (chroma.int() * 8 - 1024).unbind(1)
    b, r = (u * _YUV_UB) >> 16, (v * _YUV_VR) >> 16
    g = ((u * _YUV_UG) >> 16) + ((v * _YUV_VG) >> 16)
    chroma_bgr = torch.stack((b, g, r), 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return (y.unsqueeze(1) + chroma_bgr).clamp_(0, 255).float()


def _check_frame(frame: torch.Tensor, pixel_format: str) -> tuple[int, int]:
    """The picture's (H, W) of one frame in pixel_format; ValueError when its shape or dtype does not fit."""
    if pixel_format == "yuv420p":
        ok = frame.ndim == 2 and frame.shape[0] % 3 == 0 and frame.shape[1] % 2 == 0
        expected = "uint8 [H * 3 / 2, W] yuv420p planes (H, W even)"
        size = (int(frame.shape[0]) * 2 // 3, int(frame.shape[1])) if frame.ndim == 2 else (0, 0)
    elif pixel_format == "bgr24":
        ok = frame.ndim == 3 and frame.shape[2] == 3
        expected = "uint8 HxWx3"
        size = (int(frame.shape[0]), int(frame.shape[1])) if frame.ndim == 3 else (0, 0)
    else:
        raise ValueError(f"unknown pixel format {pixel_format!r} (bgr24 | yuv420p)")
    if not ok or frame.dtype != torch.uint8:
        raise ValueError(f"expected {expected} frames, got {frame.dtype} {tuple(frame.shape)}")
    return size


def letterbox_frames(
    frames: Sequence[torch.Tensor],
    input_hw: tuple[int, int],
    preprocess: Preprocess,
    out: torch.Tensor,
    pixel_formats: Sequence[str] | None = None,
) -> list[float]:
    """Letterbox uint8 frames (on out's device) into out[:n], float32 [n, 3, H, W]; their scales.

    pixel_formats[i] (default all "bgr24"): "bgr24" HxWx3 or "yuv420p" [H * 3 / 2, W] planes, converted to
    BGR first as swscale does (yuv420p_to_bgr), so a frame letterboxes the same whichever way it was decoded.
    streamd.model.preprocess.letterbox on the device: bilinear resize by r = min(H/h, W/w) (OpenCV's
    INTER_LINEAR, half-pixel centres, no antialiasing), rounded to whole grey levels as OpenCV's uint8
    resize does, top-left on a pad_value canvas, then channel order, mean/std and scale. Frames of the
    same size and format are converted and resized in one call.
    """
    height, width = input_hw
    formats = ["bgr24"] * len(frames) if pixel_formats is None else list(pixel_formats)
    if len(formats) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(formats)} pixel formats")
    out[: len(frames)].fill_(preprocess.pad_value)
    groups: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for index, (frame, pixel_format) in enumerate(zip(frames, formats)):
        groups[(pixel_format, *_check_frame(frame, pixel_format))].append(index)
    scales = [0.0] * len(frames)
    for (pixel_format, frame_h, frame_w), indices in groups.items():
        scale = min(height / frame_h, width / frame_w)
        new_h, new_w = int(frame_h * scale), int(frame_w * scale)
        stacked = torch.stack([frames[i] for i in indices])
        if pixel_format == "yuv420p":
            images = yuv420p_to_bgr(stacked)
        else:
            images = stacked.permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (frame_h, frame_w):
            images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        if preprocess.channel_order == "rgb":
            images = images.flip(1)
        for row, index in enumerate(indices):
            out[index, :, :new_h, :new_w] = images[row]
            scales[index] = scale
    batch = out[: len(frames)]
    if preprocess.mean is not None:
        batch -= torch.tensor(preprocess.mean, device=out.device).view(1, 3, 1, 1)
    if preprocess.std is not None:
        batch /= torch.tensor(preprocess.std, device=out.device).view(1, 3, 1, 1)
    if preprocess.scale != 1.0:
        batch *= preprocess.scale
    return scales


def postprocess_on_device(
    output: torch.Tensor,
    scales: Sequence[float],
    source_hw: Sequence[tuple[int, int]],
    conf_threshold: float,
    iou_threshold: float,
) -> list[Detections]:
    """streamd.model.postprocess on the device: float32 [N, A, 5 + C] -> N Detections in source pixels.

    score = objectness x best class score, kept when >= conf_threshold; class-aware NMS per frame in one
    torchvision batched_nms call (the group of a box is frame * C + class); boxes divided by the letterbox
    scale and clipped to the frame. Only the kept boxes are copied to the host.
    """
    count, num_classes = output.shape[0], output.shape[2] - 5
    class_score, class_id = output[..., 5:].max(dim=-1)
    confidence = output[..., 4] * class_score
    frame, anchor = torch.nonzero(confidence >= conf_threshold, as_tuple=True)
    cxcywh = output[frame, anchor, :4]
    xyxy = torch.cat((cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2), dim=1)
    score, label = confidence[frame, anchor], class_id[frame, anchor]
    keep = torchvision.ops.batched_nms(xyxy, score, frame * num_classes + label, iou_threshold)
    frame, xyxy, score, label = frame[keep], xyxy[keep], score[keep], label[keep]
    device = output.device
    xyxy = xyxy / torch.tensor(scales, dtype=torch.float32, device=device)[frame, None]
    limits = torch.tensor([(w, h, w, h) for h, w in source_hw], dtype=torch.float32, device=device)[frame]
    xyxy = torch.minimum(xyxy.clamp(min=0), limits)
    frame_np, xyxy_np = frame.cpu().numpy(), xyxy.cpu().numpy()
    score_np, label_np = score.cpu().numpy(), label.cpu().numpy()
    return [Detections(xyxy_np[frame_np == i], score_np[frame_np == i], label_np[frame_np == i]) for i in range(count)]
