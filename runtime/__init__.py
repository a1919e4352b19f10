"""edgellama.runtime: ONNX Runtime sessions, generation, bench and parity."""
