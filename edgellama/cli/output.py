"""The one shape of every command's `--json` output: one JSON object on stdout.

    {"schema": "edgellama.<command>", "version": <int>, ...the command's fields}

`schema` names what the object describes and `version` goes up when a field changes meaning or
goes away (adding a field does not bump it), so a CI script can check both before it reads on.
Numbers JSON cannot hold are written as the strings "inf", "-inf" and "nan", so the output is
valid JSON for strict parsers. With `--json` a command writes nothing else to stdout (progress
goes to stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from edgellama.folder import json_safe

VERSION = 1


def json_object(command: str, payload: dict[str, Any], *, version: int = VERSION) -> dict[str, Any]:
    """`payload` under the schema header of `command` (the header wins over same-named fields)."""
    header = {"schema": f"edgellama.{command}", "version": version}
    return {**header, **{k: v for k, v in payload.items() if k not in header}}


def json_text(obj: dict[str, Any], *, indent: int | None = None) -> str:
    return json.dumps(json_safe(obj), ensure_ascii=False, default=str, allow_nan=False, indent=indent) + "\n"


def print_json(command: str, payload: dict[str, Any], *, version: int = VERSION, stream: TextIO | None = None) -> None:
    """Print `json_object(command, payload)` as one line of JSON."""
    out = stream or sys.stdout
    out.write(json_text(json_object(command, payload, version=version)))
    out.flush()


def folder_payload(folder: Path, *, seconds: float, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What `export --json` and `quantize --json` say about the folder they wrote.

    folder    absolute path of the written model folder
    files     {name: bytes} of every file in it (edgellama.json included)
    bytes     their total
    seconds   wall time of the command, from argument checks to the folder in place
    steps     [{"step", "seconds"}] of each progress step, in order
    manifest  the folder's edgellama.json as written (config, target, dtype, quantization, io,
              files with sizes and sha256, ...)
    """
    from edgellama import folder as model_folder

    folder = Path(folder).absolute()
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"folder": str(folder), "files": files, "bytes": sum(files.values()), "seconds": round(seconds, 3),
            "steps": steps, "manifest": model_folder.read_manifest(folder).to_dict()}
