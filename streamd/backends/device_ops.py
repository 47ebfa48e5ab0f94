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


def letterbox_frames(
    frames: Sequence[torch.Tensor], input_hw: tuple[int, int], preprocess: Preprocess, out: torch.Tensor
) -> list[float]:
    """Letterbox uint8 HxWx3 BGR frames (on out's device) into out[:n], float32 [n, 3, H, W]; their scales.

    streamd.model.preprocess.letterbox on the device: bilinear resize by r = min(H/h, W/w) (OpenCV's
    INTER_LINEAR, half-pixel centres, no antialiasing), rounded to whole grey levels as OpenCV's uint8
    resize does, top-left on a pad_value canvas, then channel order, mean/std and scale. Frames of the
    same size are resized in one call.
    """
    height, width = input_hw
    out[: len(frames)].fill_(preprocess.pad_value)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != torch.uint8:
            raise ValueError(f"expected uint8 HxWx3 frames, got {frame.dtype} {tuple(frame.shape)}")
        by_size[(int(frame.shape[0]), int(frame.shape[1]))].append(index)
    scales = [0.0] * len(frames)
    for (frame_h, frame_w), indices in by_size.items():
        scale = min(height / frame_h, width / frame_w)
        new_h, new_w = int(frame_h * scale), int(frame_w * scale)
        images = torch.stack([frames[i] for i in indices]).permute(0, 3, 1, 2).float()
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
