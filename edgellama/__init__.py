"""edgellama: Llama-architecture models from PyTorch to ONNX, run and checked on ONNX Runtime.

Subpackages, in the one direction their imports run:
    edgellama.export   torch blocks, model sources, torch -> ONNX, lowering per runtime
    edgellama.quant    ONNX -> ONNX passes (fp16, int8, int8-dynamic, int4)
    edgellama.runtime  ONNX Runtime sessions, generation, bench, parity
"""

__version__ = "0.1.0"
