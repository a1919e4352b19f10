"""Quantize a model folder: check the request, run one pass, write a complete new folder.

`check_request` runs before anything is loaded (the CLI and `export --quant` call it first);
`quantize_folder` reads an fp32 edgellama export, applies the pass of `mode` (fp16.py, int8.py,
int8_dynamic.py, int4.py) and writes OUT atomically like export does (export/folder.py), with the
manifest's `quantization` list recording the pass and its settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from edgellama import folder
from edgellama.contract import describe_io
from edgellama.errors import ModelFolderError, QuantError
from edgellama.progress import SILENT, Progress
from edgellama.quant import common

MODES = common.MODES


def check_request(mode: str, block_size: int | None, *, accuracy_level: int | None = None) -> None:
    """QuantError for an unknown mode, a block size the kernel does not support, or an accuracy
    level the mode does not take."""
    if mode not in MODES:
        raise QuantError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    common.check_block_size(mode, block_size)
    _check_accuracy_level(mode, accuracy_level)


def _read_source(src: Path) -> "folder.Manifest":
    try:
        manifest = folder.verify_folder(src)
    except ModelFolderError as e:
        raise QuantError(f"cannot quantize: {e}") from None
    if manifest.quantization:
        raise QuantError(f"{src} is already quantized ({manifest.quant_pass or '?'}); quantize the fp32 export instead")
    if manifest.dtype != "fp32":
        raise QuantError(f"{src} is a {manifest.dtype} export; quantization starts from an fp32 export")
    if manifest.target not in folder.TARGETS:
        raise QuantError(f"{src}: unknown export target {manifest.target!r} in its manifest")
    return manifest


ACCURACY_LEVELS = (0, 1, 2, 3, 4)   # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


def _check_accuracy_level(mode: str, accuracy_level: int | None) -> None:
    if accuracy_level is None:
        return
    if mode not in ("int8", "int4"):
        raise QuantError(f"--accuracy-level applies to int8 and int4 only, not to {mode}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantError(f"accuracy level {accuracy_level!r} is not one of MatMulNBits' "
                         f"{', '.join(map(str, ACCURACY_LEVELS))}")


def _apply(mode: str, model, *, target: str, block_size: int | None, exclude: tuple[str, ...],
           accuracy_level: int | None) -> dict:
    level = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    if mode == "fp16":
        from edgellama.quant import fp16

        return fp16.apply(model, target=target, exclude=exclude)
    if mode == "int8":
        from edgellama.quant import int8

        return int8.apply(model, block_size=block_size, exclude=exclude, **level)
    if mode == "int4":
        from edgellama.quant import int4

        return int4.apply(model, block_size=block_size, exclude=exclude, **level)
    from edgellama.quant import int8_dynamic

    return int8_dynamic.apply(model, exclude=exclude)


def quantize_folder(src: Path | str, dst: Path | str, *, mode: str, block_size: int | None = None,
                    exclude: Iterable[str] | str = (), force: bool = False,
                    accuracy_level: int | None = None, progress: Progress = SILENT) -> Path:
    """Quantize the fp32 model folder `src` into a new complete folder `dst`; returns `dst`.

    Refuses (QuantError) an unknown mode, an unsupported block size, a folder that is not a verified
    edgellama export, or one already quantized; nothing is written at `dst` then.
    `accuracy_level` (int8/int4) overrides the pass's MatMulNBits accuracy level.
    """
    check_request(mode, block_size)
    block = common.check_block_size(mode, block_size)
    _check_accuracy_level(mode, accuracy_level)
    patterns = common.pattern_list(exclude)
    src, dst = Path(src), Path(dst)
    if dst.absolute().resolve() == src.absolute().resolve():
        raise QuantError(f"output {dst} is the input folder; write the quantized model elsewhere")
    folder.check_output(dst, force=force)
    with progress.step(f"verify {src}"):
        manifest = _read_source(src)
    with progress.step("load model"):
        model = folder.load_model_proto(src)
    before = common.count_ops(model)
    with progress.step(f"quantize ({mode})"):
        entry = _apply(mode, model, target=manifest.target, block_size=block, exclude=patterns,
                       accuracy_level=accuracy_level)
    entry["ops_before"], entry["ops_after"] = before, common.count_ops(model)
    if patterns:
        entry["exclude"] = list(patterns)
    with folder.staged_folder(dst, force=force) as tmp, progress.step("write model folder"):
        folder.save_model(model, tmp)
        folder.copy_side_files(src, tmp, manifest)
        model_rec = manifest.files.get(folder.MODEL)
        new = dataclasses.replace(
            manifest, quantization=[entry], io=describe_io(model), packages=folder.package_versions(),
            quantized_from={"path": str(src.absolute()), "model_sha256": model_rec.sha256 if model_rec else None},
            dtype="fp16" if mode == "fp16" else manifest.dtype)
        folder.write_manifest(tmp, new)
    return dst
