"""torch YOLOX -> ONNX with YOLOX's grid decode inside the graph (DESIGN contract 1).

Input `images` float32 [N, 3, H, W] with a dynamic N; output `output` float32
[N, A, 5 + C]: cx, cy, w, h in letterboxed input pixels, objectness, class
scores. The graph is simplified with onnxsim when it is installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

import onnx
import torch

from trainer.yolox_adapter import inference_model

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "output"


def export_onnx(model: torch.nn.Module, input_hw: tuple[int, int], opset: int = 17, simplify: bool = True) -> bytes:
    """The serialized ONNX model of `model` (moved to the CPU, eval mode, decode in graph)."""
    model = inference_model(model).cpu()
    dummy = torch.zeros(1, 3, *input_hw)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            model,
            dummy,
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if simplify:
        proto = _simplify(proto)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@contextlib.contextmanager
def _quiet_native_output():
    """Silence onnxsim's C++ shape-inference chatter (written straight to fds 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError:
        log.warning("onnxsim is not installed; exporting the unsimplified graph")
        return proto
    with _quiet_native_output():
        simplified, ok = onnxsim.simplify(proto)
    if not ok:
        log.warning("onnxsim could not validate the simplified graph; keeping the original")
        return proto
    return simplified
