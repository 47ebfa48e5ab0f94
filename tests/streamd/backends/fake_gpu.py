"""Fakes of torch's CUDA runtime and TensorRT's runtime for the TensorRT backend's own code, without a GPU.

They check streamd's use of the two APIs (build, cache, bind, two slots, copies, events) and run the model
through ONNX Runtime where the engine would run; the real APIs are checked by the gpu-marked tests.
"""

from __future__ import annotations

import contextlib
import json
import types

import numpy as np

from tests.streamd.backends.fake_trt_build import FakeTRTBuild


class FakeTensor:
    """A numpy array that hands out a data_ptr() the fake engine can resolve."""

    memory: dict[int, np.ndarray] = {}

    def __init__(self, array: np.ndarray):
        self.array = array

    @property
    def dtype(self):
        return self.array.dtype

    def __getitem__(self, index) -> FakeTensor:
        return FakeTensor(self.array[index])

    def copy_(self, other, non_blocking: bool = False) -> FakeTensor:
        self.array[...] = other.array if isinstance(other, FakeTensor) else other
        return self

    def data_ptr(self) -> int:
        address = self.array.__array_interface__["data"][0]
        FakeTensor.memory[address] = self.array
        return address

    def numpy(self) -> np.ndarray:
        return self.array


FAKE_CALLS: list[str] = []  # what the fake CUDA runtime was asked to do, in order


def fake_stream(device=None):
    return types.SimpleNamespace(cuda_stream=7, wait_event=lambda event: None,
                                 synchronize=lambda: FAKE_CALLS.append("stream.synchronize"))  # fmt: skip


def fake_event(blocking: bool = False):
    FAKE_CALLS.append(f"Event(blocking={blocking})")
    return types.SimpleNamespace(record=lambda stream=None: None, synchronize=lambda: None)


def fake_torch():
    cuda = types.SimpleNamespace(
        is_available=lambda: True, set_device=lambda device: None, get_device_name=lambda device: "Fake GPU 80GB",
        Stream=fake_stream, Event=fake_event, stream=lambda stream: contextlib.nullcontext(),
    )  # fmt: skip
    return types.SimpleNamespace(
        cuda=cuda, device=lambda name: name, from_numpy=FakeTensor,
        empty=lambda shape, dtype, pin_memory=False, device=None: FakeTensor(np.zeros(shape, dtype)),
    )  # fmt: skip


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

    def execute_async_v3(self, stream_handle: int) -> bool:
        count = self.shapes["images"][0]
        images = FakeTensor.memory[self.addresses["images"]][:count]
        (output,) = self.session.run(None, {"images": images})
        FakeTensor.memory[self.addresses["output"]][:count] = output
        return stream_handle == 7
