"""ONNX Runtime on the CPU: the embedded default for demos, tests and CI."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from streamd.backends.base import HostBackend
from streamd.errors import BackendError
from streamd.model.bundle import Bundle, check_io_names


class OnnxRuntimeBackend(HostBackend):
    """streamd.backends.base.Backend on ONNX Runtime's CPU provider: a HostBackend (letterbox on the host,
    the model inside submit(), decode + NMS in wait())."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, max_batch: int = 8, intra_op_threads: int = 0, providers: list[str] | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 lets ONNX Runtime use one thread per physical core.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(bundle.onnx_path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{bundle.onnx_path}: ONNX Runtime cannot load the model: {exc}") from exc
        check_io_names(bundle, [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        self.input_name = bundle.meta.onnx.input_name
        self.input_hw = tuple(bundle.meta.input_hw)
        self.preprocess = bundle.meta.preprocess
        self.max_batch = max_batch

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """The model now (ONNX Runtime is synchronous): float32 [N, 3, H, W] -> [N, A, 5 + C]."""
        try:
            (output,) = self.session.run(None, {self.input_name: np.ascontiguousarray(tensor, dtype=np.float32)})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch of shape {tensor.shape}: {exc}") from exc
        return output

    def close(self) -> None:
        self.session = None
