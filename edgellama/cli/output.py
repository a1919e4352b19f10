"""The one shape of every command's `--json` output: one JSON object on stdout.

    {"schema": "edgellama.<command>", "version": <int>, ...the command's fields}

`schema` names what the object describes and `version` goes up when a field changes meaning or
goes away (adding a field does not bump it), so a CI script can check both before it reads on.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

VERSION = 1


def json_object(command: str, payload: dict[str, Any], *, version: int = VERSION) -> dict[str, Any]:
    """`payload` under the schema header of `command` (the header wins over same-named fields)."""
    return {**payload, "schema": f"edgellama.{command}", "version": version}


def print_json(command: str, payload: dict[str, Any], *, version: int = VERSION, stream: TextIO | None = None) -> None:
    """Print `json_object(command, payload)` as one line of JSON."""
    out = stream or sys.stdout
    out.write(json.dumps(json_object(command, payload, version=version), ensure_ascii=False, default=str) + "\n")
    out.flush()
