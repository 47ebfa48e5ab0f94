"""Export: the ONNX model with the decode inside, the model bundle, TensorRT engines."""
