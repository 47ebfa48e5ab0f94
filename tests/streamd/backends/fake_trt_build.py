"""A fake of TensorRT's builder API (Builder, network, config, profiles), as streamd.backends.tensorrt_build uses it.

A "serialized engine" is JSON naming the ONNX file and the profile's max batch; fake_gpu.FakeTRT's runtime
deserializes it into an engine that runs the model with ONNX Runtime.
"""

from __future__ import annotations

import json
import types


class FakeTRTBuild:
    """The builder half of the tensorrt module streamd uses (fake_gpu.FakeTRT adds the runtime)."""

    __version__ = "10.0.1"
    builds: list[dict] = []

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16, INT8 = "fp16", "int8"

    class LayerType:
        QUANTIZE = "quantize"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    nptype = staticmethod(lambda dtype: dtype)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            self.network["onnx"] = path
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return FakeNetwork(flags=flags)

        def create_builder_config(self):
            config = types.SimpleNamespace(flags=set(), profiles=[], int8_calibrator=None)
            config.set_memory_pool_limit = lambda pool, size: setattr(config, "workspace", size)
            config.set_flag = config.flags.add
            config.add_optimization_profile = config.profiles.append
            config.set_calibration_profile = lambda profile: None
            return config

        def create_optimization_profile(self):
            shapes = {}
            return types.SimpleNamespace(shapes=shapes, set_shape=lambda name, *mmo: shapes.__setitem__(name, mmo))

        def build_serialized_network(self, network, config):
            FakeTRTBuild.builds.append({"flags": set(config.flags), "profiles": config.profiles, "calibrator": config.int8_calibrator})
            return json.dumps({"onnx": network["onnx"], "max": config.profiles[0].shapes["images"][2][0]}).encode()

class FakeNetwork(dict):
    num_layers = 0  # no Q/DQ layers: int8 needs a calibrator

    def get_layer(self, index: int):
        raise IndexError(index)
