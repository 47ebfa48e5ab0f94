"""A fake of TensorRT's builder API (Builder, network, config, profiles), as streamd.backends.tensorrt_build uses it.

A "serialized engine" is JSON naming the ONNX file and the profile's max batch; fake_gpu.FakeTRT's runtime
deserializes it into an engine that runs the model with ONNX Runtime. The fake parser reads the ONNX file into
one layer per node (TensorRT's layer type for its op, outputs typed by ONNX shape inference) on which precision
constraints are recorded; a build keeps them (`precisions`, `output_types`).

The fake build runs an int8 calibrator the way TensorRT does: get_batch until it returns None, at the
calibration profile's opt batch, and an exception raised inside get_batch ends the calibration silently
(TensorRT's Python bindings swallow it). `fake_trt11()` is TensorRT 11's module as far as the build goes:
no BuilderFlag.FP16/INT8.
"""

from __future__ import annotations

import json
import types


class FakeTRTBuild:
    """The builder half of the tensorrt module streamd uses (fake_gpu.FakeTRT adds the runtime)."""

    __version__ = "10.0.1"
    builds: list[dict] = []
    build_returns_none = False  # set True: build_serialized_network fails the way TensorRT reports it

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, INT8, TF32, OBEY_PRECISION_CONSTRAINTS = "fp16", "int8", "tf32", "obey_precision_constraints"

    class LayerType:
        QUANTIZE, CONVOLUTION, ACTIVATION, ELEMENTWISE, UNARY = "quantize", "convolution", "activation", "elementwise", "unary"
        CONCATENATION, SLICE, SHUFFLE, CONSTANT, CAST, IDENTITY = "concatenation", "slice", "shuffle", "constant", "cast", "identity"
        SHAPE, POOLING, RESIZE, OTHER = "shape", "pooling", "resize", "other"

    float32, float16, int32, int64 = "float32", "float16", "int32", "int64"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    nptype = staticmethod(lambda dtype: dtype)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            self.network["onnx"] = path
            self.network.read_onnx(path)
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return FakeNetwork(flags=flags)

        def create_builder_config(self):
            config = types.SimpleNamespace(flags=set(), cleared=set(), profiles=[], int8_calibrator=None, calibration_profile=None)
            config.set_memory_pool_limit = lambda pool, size: setattr(config, "workspace", size)
            config.set_flag = config.flags.add
            config.clear_flag = lambda flag: (config.flags.discard(flag), config.cleared.add(flag))
            config.add_optimization_profile = config.profiles.append
            config.set_calibration_profile = lambda profile: setattr(config, "calibration_profile", profile) or True
            return config

        def create_optimization_profile(self):
            shapes = {}
            return types.SimpleNamespace(shapes=shapes, set_shape=lambda name, *mmo: shapes.__setitem__(name, mmo))

        def build_serialized_network(self, network, config):
            build = {"flags": set(config.flags), "cleared": set(config.cleared), "profiles": config.profiles,
                     "calibrator": config.int8_calibrator, "calibration_profile": config.calibration_profile,
                     "calibration_batches": [],
                     "precisions": {layer.name: layer.precision for layer in network.layers if layer.precision},
                     "output_types": {layer.name: layer.output_types for layer in network.layers if layer.output_types}}  # fmt: skip
            FakeTRTBuild.builds.append(build)
            if config.int8_calibrator is not None and "int8" in config.flags:
                build["calibration_batches"] = calibrate(config.int8_calibrator)
            if FakeTRTBuild.build_returns_none:
                return None
            return json.dumps({"onnx": network["onnx"], "max": config.profiles[0].shapes["images"][2][0]}).encode()


def calibrate(calibrator) -> list[int]:
    """Run the calibrator as TensorRT does: its cache if it has one, else its batches, then the cache written from
    whatever batches came (also after a failed one); the device pointers it returned, one per batch."""
    if calibrator.read_calibration_cache() is not None:
        return []
    pointers = []
    while True:
        try:
            batch = calibrator.get_batch(["images"])
        except Exception:  # noqa: BLE001  (what TensorRT's bindings do: the calibration just ends)
            break
        if batch is None:
            break
        pointers.append(batch[0])
    if pointers:
        calibrator.write_calibration_cache(f"scales of {len(pointers)} batches".encode())
    return pointers


# ONNX op -> TensorRT's layer type as its ONNX parser makes it (the ops YOLOX and the tests' tiny model use).
LAYER_TYPES = {
    "Conv": "CONVOLUTION", "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE",
    "Sub": "ELEMENTWISE", "Div": "ELEMENTWISE", "Exp": "UNARY", "Concat": "CONCATENATION", "Slice": "SLICE",
    "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Constant": "CONSTANT", "Cast": "CAST", "Identity": "IDENTITY",
    "Shape": "SHAPE", "MaxPool": "POOLING", "Resize": "RESIZE", "QuantizeLinear": "QUANTIZE",
}  # fmt: skip
ONNX_TYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64"}


class FakeTensor(types.SimpleNamespace):
    """A network tensor: name and dtype."""


class FakeLayer:
    """One parsed ONNX node as a TensorRT layer: name, type, input and output tensors, and the precision
    constraints set on it (`precision`, `output_types`: output index -> type)."""

    def __init__(self, name: str, layer_type: str, inputs: list, outputs: list):
        self.name, self.type, self.inputs, self.outputs = name, layer_type, inputs, outputs
        self.num_inputs, self.num_outputs = len(inputs), len(outputs)
        self.precision, self.output_types = None, {}

    def get_input(self, index: int):
        return self.inputs[index]

    def get_output(self, index: int):
        return self.outputs[index]

    def set_output_type(self, index: int, dtype) -> None:
        self.output_types[index] = dtype


class FakeNetwork(dict):
    """The parsed network: one FakeLayer per ONNX node, in the file's (topological) order."""

    def __init__(self, **fields):
        super().__init__(**fields)
        self.layers: list[FakeLayer] = []
        self.outputs: list[FakeTensor] = []

    def read_onnx(self, path: str) -> None:
        import onnx

        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        graph = model.graph
        dtypes = {v.name: ONNX_TYPES.get(v.type.tensor_type.elem_type, "other") for v in [*graph.value_info, *graph.input, *graph.output]}
        dtypes.update({t.name: ONNX_TYPES.get(t.data_type, "other") for t in graph.initializer})
        tensors = {name: FakeTensor(name=name, dtype=dtype) for name, dtype in dtypes.items()}
        for node in graph.node:
            inputs = [tensors.setdefault(name, FakeTensor(name=name, dtype="other")) if name else None for name in node.input]
            outputs = [tensors.setdefault(name, FakeTensor(name=name, dtype="other")) for name in node.output]
            layer_type = getattr(FakeTRTBuild.LayerType, LAYER_TYPES.get(node.op_type, "OTHER"))
            self.layers.append(FakeLayer(node.name or node.output[0], layer_type, inputs, outputs))
        self.outputs = [tensors[output.name] for output in graph.output]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self.layers[index]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, index: int) -> FakeTensor:
        return self.outputs[index]


def fake_trt11():
    """TensorRT 11's module, as far as the build goes: BuilderFlag has no FP16/INT8 (nor INT8 calibration)."""

    class FakeTRT11(FakeTRTBuild):
        __version__ = "11.0.0"

        class BuilderFlag:
            TF32 = "tf32"

    return FakeTRT11


class FakeCalibrator:
    """An Int8Calibrator over ready-made batches (fake device pointers), for serialize_engine's own tests."""

    def __init__(self, batch_size: int, batches: int):
        self.batch_size, self.left, self.error = batch_size, batches, None

    def get_batch_size(self) -> int:
        return self.batch_size

    def get_batch(self, names):
        if self.left == 0:
            return None
        self.left -= 1
        return [1000 + self.left]

    def read_calibration_cache(self):
        return None

    def write_calibration_cache(self, cache) -> None:
        pass


def fake_build_torch():
    """The torch calls an engine build makes: the CUDA device, and a calibration batch uploaded with .cuda()."""

    class DeviceArray:
        def __init__(self, array):
            self.array = array

        def cuda(self):
            return self

        def data_ptr(self) -> int:
            return self.array.__array_interface__["data"][0]

    cuda = types.SimpleNamespace(is_available=lambda: True, set_device=lambda device: None,
                                 get_device_name=lambda device: "Fake GPU 80GB")  # fmt: skip
    return types.SimpleNamespace(cuda=cuda, from_numpy=DeviceArray)
