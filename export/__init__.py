"""edgellama.export: torch Llama blocks, model sources, and torch -> ONNX export with lowering.

Kept import-light (no torch at import time) so the runtime can use the tokenizer and manifest
helpers without loading torch.
"""
