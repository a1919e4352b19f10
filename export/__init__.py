"""edgellama.export: model sources, torch Llama blocks, and torch -> ONNX export with lowering.

Importing the package loads no torch: the modules that need it import it themselves.
"""
