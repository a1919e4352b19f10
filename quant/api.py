"""Quantize a model: in memory (`quantize_model`, what `export --quant` runs) or folder to folder.

`check_request` (registry.py) runs once, before anything is loaded; `quantize_model` (or
`apply_request` for a request already checked) applies the pass to an onnx_ir Model in place;
`quantize_folder` reads an fp32 edgellama export, applies the pass and writes OUT atomically like
export does, with the manifest's `quantization` list recording the pass and its settings.

An fp16 export is quantized too (int8, int4, int8-dynamic): widen.py first turns its graph into
the fp32 graph of the same fp16-rounded weights, so the passes and their output are those of an
fp32 export (fp32 activations); `quantized_from` records `"dtype": "fp16"`. Export fp16 straight
from the checkpoint to skip the 2x larger fp32 folder (an 8B model: 16 GB instead of 32 GB).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from edgellama import folder
from edgellama.contract import describe_io
from edgellama.errors import ModelFolderError, QuantError
from edgellama.progress import SILENT, Progress
from edgellama.quant.registry import ACCURACY_LEVELS, MODES, PASSES, Request, check_request

__all__ = ["ACCURACY_LEVELS", "MODES", "apply_request", "check_request", "quantize_model", "quantized_manifest",
           "quantize_folder"]


def quantize_model(model: Any, *, mode: str, target: str, block_size: int | None = None,
                   accuracy_level: int | None = None, exclude: Iterable[str] | str = (),
                   lm_head_bits: int | None = None, progress: Progress = SILENT) -> dict:
    """Apply the pass of `mode` to the fp32 onnx_ir Model `model` in place; returns the manifest's
    record of the pass (its settings and the op counts before and after)."""
    request = check_request(mode, block_size, accuracy_level=accuracy_level, exclude=exclude,
                            lm_head_bits=lm_head_bits)
    return apply_request(model, request, target=target, progress=progress)


def apply_request(model: Any, request: Request, *, target: str, progress: Progress = SILENT) -> dict:
    """`quantize_model` for a request already checked (`check_request`, run before any loading)."""
    from edgellama.quant import fast_silu, skip_norm
    from edgellama.quant.common import count_ops

    before = count_ops(model)
    with progress.step(f"quantize ({request.quant_pass.name})"):
        entry = request.quant_pass.apply(model, target=target, settings=request.settings)
        # Where the fp32 export chose accuracy over a fused kernel, a quantized graph takes the
        # kernel; after the pass, so the pass sees the graph the export wrote.
        entry["fast_silu"] = fast_silu.apply(model)
        entry["skip_norms"] = skip_norm.apply(model, target=target)
    entry["ops_before"], entry["ops_after"] = before, count_ops(model)
    if request.settings.exclude:
        entry["exclude"] = list(request.settings.exclude)
    return entry


def quantized_manifest(manifest: folder.Manifest, model: Any, entry: dict, *,
                       quantized_from: dict[str, Any]) -> folder.Manifest:
    """The manifest of a quantized model: the fp32 one with the pass recorded."""
    dtype = PASSES[entry["pass"]].dtype or manifest.dtype
    return dataclasses.replace(manifest, quantization=[entry], io=describe_io(model), dtype=dtype,
                               packages=folder.package_versions(), quantized_from=quantized_from)


# Source dtypes each pass starts from: fp16 only from fp32 (an fp16 folder already is fp16).
_SOURCE_DTYPES = {"fp16": ("fp32",)}
_DEFAULT_SOURCE_DTYPES = ("fp32", "fp16")


def _read_source(src: Path, mode: str) -> folder.Manifest:
    try:
        manifest = folder.verify_folder(src)
    except ModelFolderError as e:
        raise QuantError(f"cannot quantize: {e}") from None
    if manifest.quantization:
        raise QuantError(f"{src} is already quantized ({manifest.quant_pass or '?'}); quantize the fp32 export instead")
    allowed = _SOURCE_DTYPES.get(mode, _DEFAULT_SOURCE_DTYPES)
    if manifest.dtype == "fp16" and mode == "fp16":
        raise QuantError(f"{src} is already an fp16 export; there is nothing for --mode fp16 to do")
    if manifest.dtype not in allowed:
        raise QuantError(f"{src} is a {manifest.dtype} export; {mode} starts from an {' or '.join(allowed)} export")
    if manifest.target not in folder.TARGETS:
        raise QuantError(f"{src}: unknown export target {manifest.target!r} in its manifest")
    return manifest


def quantize_folder(src: Path | str, dst: Path | str, *, mode: str, block_size: int | None = None,
                    exclude: Iterable[str] | str = (), force: bool = False,
                    accuracy_level: int | None = None, lm_head_bits: int | None = None,
                    progress: Progress = SILENT) -> Path:
    """Quantize the fp32 (or, but for --mode fp16, fp16) model folder `src` into a new complete
    folder `dst`; returns `dst`.

    Refuses (QuantError) an unknown mode, an unsupported block size, a folder that is not a verified
    edgellama export, one already quantized, or fp16 -> fp16; nothing is written at `dst` then.
    `accuracy_level` (int8/int4) overrides the pass's MatMulNBits accuracy level, `lm_head_bits`
    (int4: 8 or 4) the lm_head's bit width.
    """
    request = check_request(mode, block_size, accuracy_level=accuracy_level, exclude=exclude,
                            lm_head_bits=lm_head_bits)
    src, dst = Path(src), Path(dst)
    if dst.absolute().resolve() == src.absolute().resolve():
        raise QuantError(f"output {dst} is the input folder; write the quantized model elsewhere")
    folder.check_output(dst, force=force, inputs=(src,))
    with progress.step(f"verify {src}"):
        manifest = _read_source(src, mode)
    with progress.step("load model"):
        model = folder.load_model_ir(src)
    source_dtype = manifest.dtype
    if source_dtype == "fp16":
        from edgellama.quant import widen

        if not widen.is_fp16(model):
            raise QuantError(f"{src}: its manifest says fp16 but model.onnx holds no float16 weights or inputs; "
                             "not an fp16 export edgellama wrote")
        with progress.step("widen fp16 -> fp32"):
            widened = widen.apply(model, provider=manifest.provider)
        manifest = dataclasses.replace(manifest, dtype="fp32")
    entry = apply_request(model, request, target=manifest.target, progress=progress)
    if source_dtype == "fp16":
        entry["widened"] = widened
    model_rec = manifest.files.get(folder.MODEL)
    new = quantized_manifest(manifest, model, entry, quantized_from={
        "path": str(src.absolute()), "model_sha256": model_rec.sha256 if model_rec else None,
        "dtype": source_dtype})
    with folder.staged_folder(dst, force=force, inputs=(src,)) as tmp, progress.step("write model folder"):
        folder.save_model(model, tmp)
        folder.copy_side_files(src, tmp, manifest)
        folder.write_manifest(tmp, new)
    return dst
