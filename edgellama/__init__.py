"""edgellama: Llama-architecture models from PyTorch to ONNX, run and checked on ONNX Runtime.

The root package is the base every layer reads: the model folder and its typed manifest
(`folder`), the graph contract (`contract`), the tokenizer, errors and progress lines.
Subpackages, in the one direction their imports run:
    edgellama.export   torch blocks, model sources, torch -> ONNX, lowering per runtime
    edgellama.quant    ONNX -> ONNX passes (fp16, int8, int8-dynamic, int4)
    edgellama.runtime  ONNX Runtime sessions and generation: the embeddable core
    edgellama.check    parity, quality and bench: the CI layer, beside the CLI (edgellama.cli)
"""

__version__ = "0.1.0"
