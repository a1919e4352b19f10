"""edgellama.quant: quantization passes on onnx_ir models (registry.py lists them, api.py runs them)."""
