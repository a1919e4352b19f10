"""Lowering: the portable model's edgellama function ops -> a runtime's own kernels.

`engine.py` is the rule engine every target shares, `targets.py` maps each target to its rules,
one file per rule (`ort_*.py`, `onnx23_*.py`), and `attention_bias.py` holds the attention mask
that the GQA function body and both attention rules build.
"""

from edgellama.export.lower.engine import Lowered, Refusal, Report, Rule
from edgellama.export.lower.targets import (
    LOWERINGS, lower, lower_onnx23, lower_onnx23_with_report, lower_ort, lower_ort_with_report, lower_with_report,
)

__all__ = ["LOWERINGS", "Lowered", "Refusal", "Report", "Rule", "lower", "lower_onnx23",
           "lower_onnx23_with_report", "lower_ort", "lower_ort_with_report", "lower_with_report"]
