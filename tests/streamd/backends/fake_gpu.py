"""A recording CUDA runtime on the CPU for streamd.backends.cuda_slots, and a fake of TensorRT's runtime.

RecordingRuntime stands in for cuda_slots.CudaRuntime: tensors are CPU tensors, every call runs at once, and each
stream operation is recorded in order as (stream, operation, slot) in CALLS, so that the slot code of the torch
and TensorRT backends runs here and the tests assert the order the GPU needs: the upload and `record uploaded`
on the upload stream; the compute stream waiting for `uploaded` before the model or engine; the copies out and
`record done` on the compute stream; a reused slot waiting for its previous batch ("host", "wait done", slot).
Each call also checks that it runs under the runtime's device guard in the calling thread.

FakeTRT's engine runs the ONNX model with ONNX Runtime on the tensors at the addresses it is given, and records
its execute_async_v3 on the stream whose handle it got. The real APIs are checked by the gpu-marked tests.
"""

from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import torch

from streamd.backends.base import FrameBatch, Picture

from tests.streamd.backends.fake_trt_build import FakeTRTBuild

CALLS: list[tuple[str, str, int | None]] = []  # (stream or "host", operation, slot), in order
GUARDS: list[tuple[str, str]] = []  # (thread name, device) of each entry into a device guard
DEVICE_MEMORY: dict[int, torch.Tensor] = {}  # the "device" allocations, by address, for the fake engine
_THREAD = threading.local()  # per thread: the device guards entered, the streams made current


def clear() -> None:
    CALLS.clear()
    GUARDS.clear()
    DEVICE_MEMORY.clear()


def note(stream: str, operation: str, slot: int | None = None) -> None:
    """Record one operation; an AssertionError when the calling thread is not under a device guard."""
    if not getattr(_THREAD, "devices", None):
        raise AssertionError(f"{operation} on {stream} in thread {threading.current_thread().name} outside the device guard")
    CALLS.append((stream, operation, slot))


def current_stream() -> str:
    streams = getattr(_THREAD, "streams", None)
    return streams[-1] if streams else "default"


def recorded(function, operation: str):
    """`function`, noting `operation` on the current stream at each call (for the model, the letterbox)."""

    def wrapper(*args, **kwargs):
        note(current_stream(), operation)
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _pushed(stack: str, value: str):
    """`value` on top of this thread's `stack` (its device guards, its current streams) while inside."""
    setattr(_THREAD, stack, [*getattr(_THREAD, stack, []), value])
    try:
        yield
    finally:
        setattr(_THREAD, stack, getattr(_THREAD, stack)[:-1])


class FakeStream:
    def __init__(self, name: str):
        self.name = self.cuda_stream = name  # the handle execute_async_v3 gets: the fake engine notes it


class FakeEvent:
    def __init__(self, kind: str, slot: int):
        self.kind, self.slot = kind, slot


class RecordingRuntime:
    """cuda_slots.CudaRuntime's calls on the CPU, run at once and recorded in CALLS."""

    gpu_name = "Fake GPU 80GB"

    def __init__(self, device, label: str):
        self.configured = str(device)  # the CUDA device the backend was configured for, as guards record it
        self.device = torch.device("cpu")  # where its tensors are

    def guard(self):
        GUARDS.append((threading.current_thread().name, self.configured))
        return _pushed("devices", self.configured)

    def stream(self, name: str) -> FakeStream:
        return FakeStream(name)

    def event(self, kind: str, slot: int) -> FakeEvent:
        return FakeEvent(kind, slot)

    def on(self, stream: FakeStream):
        return _pushed("streams", stream.name)

    def handle(self, stream: FakeStream) -> str:
        return stream.cuda_stream

    def pinned(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype) -> torch.Tensor:
        tensor = torch.zeros(shape, dtype=dtype)
        DEVICE_MEMORY[tensor.data_ptr()] = tensor
        return tensor

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: FakeStream, what: str, slot: int) -> None:
        note(stream.name, what, slot)
        dst.copy_(src)

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        note(stream.name, f"record {event.kind}", event.slot)

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        note(stream.name, f"wait {event.kind}", event.slot)

    def wait(self, event: FakeEvent) -> None:
        note("host", f"wait {event.kind}", event.slot)

    def synchronize(self, stream: FakeStream) -> None:
        note("host", f"synchronize {stream.name}")

    def capture(self, runs: dict) -> dict:
        """No graphs on the CPU: each run once (the warm-up), and a replay that notes itself and runs it."""
        replays = {}
        for key, run in runs.items():
            run()
            replays[key] = recorded(run, f"replay {key}")
        return replays


class FakeTRT(FakeTRTBuild):
    """The part of the tensorrt module streamd uses; the 'engine' runs the ONNX model with ONNX Runtime."""

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return FakeEngine(json.loads(data))


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, spec: dict):
        self.spec = spec

    def get_tensor_name(self, index: int) -> str:
        return ("images", "output")[index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "images" else "output"

    def get_tensor_dtype(self, name: str):
        return np.dtype(np.float32)

    def create_execution_context(self):
        return FakeContext(self.spec)


class FakeContext:
    def __init__(self, spec: dict):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.max_batch, self.shapes, self.addresses = spec["max"], {}, {}

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(shape)
        return 1 <= shape[0] <= self.max_batch

    def get_tensor_shape(self, name: str):
        return (self.shapes["images"][0], 84, 8)  # the tiny bundle: a YOLOX head at 64x64, 3 classes

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle) -> bool:
        note(stream_handle, "execute")
        count = self.shapes["images"][0]
        images = DEVICE_MEMORY[self.addresses["images"]][:count]
        (output,) = self.session.run(None, {"images": images.numpy()})
        DEVICE_MEMORY[self.addresses["output"]][:count] = torch.from_numpy(output)
        return True


def frame_batch(images, layouts, prescales, source_hw, conf_threshold: float, iou_threshold: float) -> FrameBatch:
    """A FrameBatch from per-picture columns (what the tests have at hand)."""
    pictures = (Picture(image, layout, prescale, tuple(hw)) for image, layout, prescale, hw in zip(images, layouts, prescales, source_hw, strict=True))
    return FrameBatch(tuple(pictures), conf_threshold, iou_threshold)
