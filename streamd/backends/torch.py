"""PyTorch on a CUDA GPU or the CPU: the bundle's weights.safetensors in pixeltable-yolox's YOLOX.

The model is rebuilt from bundle.json's `yolox` fields, loaded from
safetensors (never a pickle), its batch-norms folded into the convolutions,
and the head run without YOLOX's own decode (`decode_in_inference` builds
its grids on the CPU at every call, which breaks CUDA-graph capture):
`GridDecode` holds the grids and strides of the bundle's input size as
device buffers instead.

TorchBackend is a base.Backend that takes BGR and yuv420p pictures:

- `submit(FrameBatch)`: uint8 pictures as decoded go up as they are; colour
  conversion and letterbox (device_ops.letterbox_frames), the model, the
  score threshold and class-aware NMS (device_ops.postprocess_on_device) run
  on the device; only the kept boxes come back, in source pixels.
- `submit_tensor(tensor)` (warm-up's contract check, parity tests, bare-model
  benchmarks): a letterboxed float32 [N, 3, H, W] batch; wait() gives the
  decoded float32 [N, A, 5 + C], the same rows as model.onnx.

On CUDA (`device: cuda:N`) both are asynchronous on the slots of
streamd.backends.cuda_slots (two batches in flight; upload and letterbox on
an upload stream, the model on a compute stream after the upload's event;
threshold and NMS in wait(), after the slot's done event), every call under
that device in the calling thread. With `cuda_graphs`, one graph per
batch-size bucket (1, 2, 4, ... max_batch) is captured at start, warm-up
included; a batch is padded to its bucket, and its output is copied out of
the graph's static output (shared by both slots) into the slot's own on the
compute stream. fp32 on CUDA is IEEE fp32: TF32 (PyTorch's default for
cuDNN convolutions) is turned off, process-wide, when the backend is built. On the CPU (`device: cpu`), both run the model in fp32 inside the
call and return a base.Ready.

`torch`, `torchvision` and `yolox` are imported only by the GPU backends,
and this module only when a torch backend is built (the `gpu` extra
installs them).
"""

from __future__ import annotations

import logging
import numpy as np
import torch

from streamd.backends import cuda_slots
from streamd.backends.base import FrameBatch, Ready, check_count
from streamd.backends.cuda_slots import source_scales
from streamd.backends.device_ops import GridDecode, letterbox_frames, postprocess_on_device
from streamd.config import TorchConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle
from streamd.model.postprocess import Decoded

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reexport_hint(bundle: Bundle) -> str:
    return (
        f"{bundle.path} has no weights.safetensors, which the torch backend runs: re-export it with "
        f"`trainer export RUN_DIR -o {bundle.path}` (a bundle whose checkpoint is gone: "
        f"`python -m trainer.export.recover {bundle.path} EXPERIMENT.yaml`), or use backend onnxruntime or tensorrt"
    )


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a CUDA graph is captured for: powers of two below max_batch, and max_batch."""
    buckets = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return (*buckets, max_batch)


class YoloxDecoded(torch.nn.Module):
    """The YOLOX model and the decode: float [N, 3, H, W] -> float32 [N, A, 5 + C], model.onnx's output."""

    def __init__(self, model: torch.nn.Module, decode: GridDecode):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.model(images))


def load_model(bundle: Bundle) -> YoloxDecoded:
    """The bundle's YOLOX on the CPU in fp32, eval mode, batch-norm folded, decode with precomputed grids."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from yolox.config import YoloxConfig
    from yolox.utils import fuse_model

    arch = bundle.meta.yolox
    if bundle.weights_path is None or arch is None:
        raise BackendError(reexport_hint(bundle))
    # get_model() sets YOLOX's batch-norm eps (1e-3), which the weights were trained and folded with.
    config = YoloxConfig(name=bundle.meta.architecture, num_classes=arch.num_classes, depth=arch.depth,
                         width=arch.width, depthwise=arch.depthwise, act=arch.act)  # fmt: skip
    model = config.get_model()
    if tuple(model.head.strides) != tuple(arch.strides):
        raise BackendError(f"{bundle.path}: yolox.strides {list(arch.strides)}, but YOLOX's head has {model.head.strides}")
    try:
        model.load_state_dict(load_file(bundle.weights_path, device="cpu"))
    except (RuntimeError, SafetensorError, OSError) as exc:
        raise BackendError(f"{bundle.weights_path}: does not fit a {bundle.meta.architecture} as bundle.json describes: {exc}") from exc
    model.eval()
    model.head.decode_in_inference = False
    with torch.no_grad():  # else the folded weights are non-leaf tensors, which Module.to() warns about
        fuse_model(model)
    model.requires_grad_(False)
    return YoloxDecoded(model, GridDecode(tuple(bundle.meta.input_hw), arch.strides)).eval()


# --- the backend -----------------------------------------------------------------------------------


class TorchBackend:
    """streamd.backends.base.Backend on PyTorch, for batches of 1..max_batch frames, BGR or yuv420p."""

    name = "torch"
    pixel_formats = frozenset({"bgr24", "yuv420p"})

    def __init__(self, bundle: Bundle, config: TorchConfig, max_batch: int = 8):
        self.max_batch = max_batch
        self.input_hw = tuple(bundle.meta.input_hw)
        self.preprocess = bundle.meta.preprocess
        self.precision = config.compute_precision
        self.dtype = DTYPES[self.precision]
        net = load_model(bundle)
        self.rows = (sum((self.input_hw[0] // s) * (self.input_hw[1] // s) for s in bundle.meta.yolox.strides),
                     5 + bundle.meta.yolox.num_classes)  # fmt: skip
        self.slots: cuda_slots.CudaSlots | None = None
        self.replays: dict[int, object] = {}
        device = torch.device(config.device)
        if device.type == "cpu":
            self.net = net
            log.info("torch backend on the CPU (fp32, %d threads)", torch.get_num_threads())
            return
        runtime = cuda_slots.CudaRuntime(device, "backend torch")
        try:
            with runtime.guard():
                torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
                if self.precision == "fp32":  # IEEE fp32, as the TensorRT path builds it: PyTorch's default is TF32 convolutions
                    torch.backends.cudnn.allow_tf32 = False
                    torch.backends.cuda.matmul.allow_tf32 = False
                self.net = net.to(device=runtime.device, dtype=self.dtype)
                self.net.decode.float()  # grids and strides stay float32: the decode runs in float32
                self.slots = cuda_slots.CudaSlots(runtime, "backend torch", max_batch, (3, *self.input_hw), torch.float32,
                                                  self.rows, torch.float32)  # fmt: skip
                if config.cuda_graphs:
                    self._capture(runtime)
        except RuntimeError as exc:  # out of memory, a failed capture
            raise BackendError(f"backend torch: cannot set up {device} for batches of {max_batch}: {exc}") from exc
        log.info("torch backend on %s (%s), %s, CUDA graphs %s", device, runtime.gpu_name, self.precision,
                 "for batches " + "/".join(map(str, self.replays)) if self.replays else "off")  # fmt: skip

    def _capture(self, runtime) -> None:
        """A CUDA graph per batch bucket: the model reads static_in[:bucket] and writes static_out[:bucket]."""
        self.static_in = runtime.empty((self.max_batch, 3, *self.input_hw), self.dtype).fill_(self.preprocess.pad_value)
        self.static_out = runtime.empty((self.max_batch, *self.rows), torch.float32)

        def run(bucket: int):
            return lambda: self.static_out[:bucket].copy_(self.net(self.static_in[:bucket]))

        with torch.inference_mode():
            self.replays = dict(sorted(runtime.capture({b: run(b) for b in batch_buckets(self.max_batch)}).items()))

    def _run(self, images: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The model on the compute stream (cuda_slots.Run): float32 [n, 3, H, W] -> float32 [n, A, 5 + C].

        With graphs, the batch goes into its bucket's static input and the graph replays; the result is a
        view of the static output, which the slot copies into its own output before the next replay.
        """
        if not self.replays:
            return self.net(images.to(self.dtype))
        count = images.shape[0]
        bucket = next(b for b in self.replays if b >= count)
        self.static_in[:count].copy_(images)
        self.replays[bucket]()
        return self.static_out[:count]

    def submit_tensor(self, tensor: np.ndarray):
        """Start a letterboxed float32 [N, 3, H, W] batch; wait() on the result gives float32 [N, A, 5 + C]."""
        check_count(self, len(tensor))
        tensor = np.ascontiguousarray(tensor, dtype=np.float32)
        if self.slots is not None:
            return self.slots.submit_tensor(tensor, self._run)
        with torch.inference_mode():
            return Ready(self.net(torch.from_numpy(tensor)).numpy())

    def submit(self, batch: FrameBatch):
        """Start up to max_batch pictures (base.Backend); wait() gives one Detections per picture, in source pixels."""
        batch.check(self)
        if self.slots is not None:
            return self.slots.submit(batch, self.input_hw, self.preprocess, self._run)
        with torch.inference_mode():
            tensor = torch.empty((len(batch), 3, *self.input_hw))
            frames = [torch.from_numpy(np.array(p.image)) for p in batch.pictures]  # writable copies: frames are read-only
            scales = letterbox_frames(frames, self.input_hw, self.preprocess, tensor, [p.layout for p in batch.pictures])
            output, scales = self.net(tensor), source_scales(scales, batch.prescales())
            found = postprocess_on_device(output, scales, batch.source_hw(), batch.conf_threshold, batch.iou_threshold)
            return Ready(Decoded.uncounted(found))

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
        self.slots, self.net, self.replays = None, None, {}
