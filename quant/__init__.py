"""edgellama.quant: ONNX -> ONNX quantization passes."""
