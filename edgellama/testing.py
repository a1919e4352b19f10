"""Helpers for users' own test suites.

    from edgellama.testing import assert_parity
    assert_parity("out/model-int8", reference="out/model-fp32")

`assert_parity` runs `edgellama parity` in-process and raises AssertionError carrying the
terminal report when the check fails; bad input still raises the EdgellamaError it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def assert_parity(model: str | Path, *, reference: str | Path = "torch", providers: str | list[str] = "cpu",
                  prompts: list[str] | None = None, decode_steps: int = 8,
                  tolerances: dict[str, float | None] | None = None, precision: str | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """Assert that `model` passes parity against `reference`; returns the JSON report when it does.

    `tolerances` overrides keys of the precision's table (check/parity_tolerances.py), as
    `--tolerance KEY=VALUE` does; other keyword arguments go to `edgellama.check.parity.run_parity`.
    """
    from edgellama.check import parity, parity_report

    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    report = parity.run_parity(Path(model), reference=str(reference), providers=providers, prompts=prompts,
                               decode_steps=decode_steps, tolerances=tolerances, precision=precision, **kwargs)
    if not parity.report_passed(report):
        raise AssertionError("\n" + parity_report.to_text(report))
    return report
