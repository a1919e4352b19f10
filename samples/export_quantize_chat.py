"""From the embedded SmolLM2-135M-Instruct to a chat, in-process: export, quantize to int8 if the
quantizer is installed, then answer a few questions.

    python samples/export_quantize_chat.py --out out/sample
"""

import argparse
from pathlib import Path

from edgellama.export.onnx_export import export_model
from edgellama.runtime.generator import Generator

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/sample"))
    out = ap.parse_args().out
    folder = export_model("smollm2", out / "smollm2", target="ort", force=True)
    try:
        from edgellama.quant.api import quantize_folder
    except ImportError:
        print("(no quantizer installed: chatting with the fp32 model)")
    else:
        folder = quantize_folder(folder, out / "smollm2-int8", mode="int8", force=True)
    gen = Generator(folder, provider="cpu")
    for q in QUESTIONS:
        print(f"\n> {q}")
        for piece in gen.stream(q, chat=True, max_new_tokens=64):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
