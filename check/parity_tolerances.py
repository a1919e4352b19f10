"""Parity tolerances per precision, each value with the reason it is what it is.

A key names a metric of `check/metrics.py` and the quantity it gates; `None` means reported but not
gated. Errors (`max_abs`, `max_rel`, `kl_*`, `kv_max_rel`, `block_rel`) are upper bounds;
agreements (`cosine`, `top1`, `top5`, `kv_cosine`, `greedy_match`) are lower bounds.
`--tolerance KEY=VALUE` overrides one key (`VALUE` may be `none` to stop gating it).
"""

from __future__ import annotations

import math

from edgellama.errors import EdgellamaError

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int4")

# Which way each key gates: "max" = the metric must be <= the value, "min" = >= the value.
DIRECTION = {
    "max_abs": "max", "max_rel": "max", "p999_abs": "max", "cosine": "min",
    "kl_mean": "max", "kl_max": "max", "top1": "min", "top5": "min",
    "kv_max_rel": "max", "kv_cosine": "min", "greedy_match": "min", "block_rel": "max",
}

# Values are set from measurements (see the reasons) with headroom of ~10x over what a correct
# model showed, so a CI job fails on a real regression and not on a different BLAS.
TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {
        "max_abs": None, "max_rel": 1e-4, "p999_abs": None, "cosine": 0.99999,
        "kl_mean": 1e-6, "kl_max": 1e-5, "top1": 0.99, "top5": 0.98,
        "kv_max_rel": 1e-4, "kv_cosine": 0.99999, "greedy_match": 1.0, "block_rel": 1e-4,
    },
    "fp16": {
        "max_abs": None, "max_rel": 2e-2, "p999_abs": None, "cosine": 0.999,
        "kl_mean": 1e-3, "kl_max": 2e-2, "top1": 0.9, "top5": 0.85,
        "kv_max_rel": 1e-2, "kv_cosine": 0.999, "greedy_match": None, "block_rel": 1e-2,
    },
    "int8": {
        "max_abs": None, "max_rel": None, "p999_abs": None, "cosine": 0.99,
        "kl_mean": 2e-2, "kl_max": 0.2, "top1": 0.8, "top5": 0.7,
        "kv_max_rel": None, "kv_cosine": 0.99, "greedy_match": None, "block_rel": 0.1,
    },
    "int8-dynamic": {
        "max_abs": None, "max_rel": None, "p999_abs": None, "cosine": 0.98,
        "kl_mean": 6e-2, "kl_max": 0.5, "top1": 0.7, "top5": 0.6,
        "kv_max_rel": None, "kv_cosine": 0.98, "greedy_match": None, "block_rel": 0.2,
    },
    "int4": {
        "max_abs": None, "max_rel": None, "p999_abs": None, "cosine": 0.95,
        "kl_mean": 0.1, "kl_max": 1.0, "top1": 0.6, "top5": 0.5,
        "kv_max_rel": None, "kv_cosine": 0.95, "greedy_match": None, "block_rel": 0.3,
    },
}

REASONS: dict[str, str] = {
    "fp32": "fp32 against fp32: only summation order differs (ORT's kernels vs torch's), which moves "
            "logits by ~1e-6 of their range; 1e-4 relative leaves headroom for other BLAS builds and "
            "the CUDA provider, while any wrong weight or op moves them by far more. top-1 may still "
            "flip on an exact near-tie, hence 0.99 and not 1.",
    "fp16": "fp16 weights and activations carry an 11-bit mantissa (relative step ~1e-3); the error "
            "compounds over the layers, so logits drift by ~1e-3 of their range and the next-token "
            "distribution by ~1e-4 nats. Near-tied candidates may swap, so top-1 needs >= 0.9 only.",
    "int8": "int8 weights (per-block or per-channel scales) add ~0.5% relative noise per matmul; "
            "logit errors are then not meaningful elementwise, so the gates are distribution "
            "metrics: KL below 0.02 nats on average and top-1 agreement >= 0.8.",
    "int8-dynamic": "int8 weights and activations quantized per token to 8 bits at run time (W8A8): "
                    "every matmul input is rounded too, and outlier channels cost resolution, so "
                    "the drift is several times int8 weight-only's (smollm2: mean KL 2.6e-2 against "
                    "3e-3); KL below 0.06 nats on average and top-1 >= 0.7.",
    "int4": "int4 weights (16 levels per block) perturb every matmul by several percent; a usable "
            "int4 model still keeps most of the distribution, so KL below 0.1 nats on average and "
            "top-1 agreement >= 0.6 (a broken one is near 0 or chance).",
}


def looser(a: str, b: str) -> str:
    """The lower of two precisions: comparing int8 with fp16 uses int8's tolerances."""
    return max(a, b, key=PRECISIONS.index)


def parse_overrides(items: list[str] | None) -> dict[str, float | None]:
    """`KEY=VALUE` strings to a dict; `VALUE` is a float or `none` (report only)."""
    out: dict[str, float | None] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DIRECTION:
            raise EdgellamaError(f"--tolerance expects KEY=VALUE with KEY one of {', '.join(DIRECTION)}; "
                                 f"got {item!r}")
        if value.strip().lower() in ("none", "off", ""):
            out[key] = None
            continue
        try:
            v = float(value)
        except ValueError:
            raise EdgellamaError(f"--tolerance {key}: {value!r} is not a number") from None
        if math.isnan(v):
            raise EdgellamaError(f"--tolerance {key}: NaN is not a tolerance")
        out[key] = v
    return out


def resolve(precision: str, overrides: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """The tolerance table of `precision` with `overrides` applied."""
    if precision not in TOLERANCES:
        raise EdgellamaError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    table = dict(TOLERANCES[precision])
    for key, value in (overrides or {}).items():
        if key not in DIRECTION:
            raise EdgellamaError(f"unknown tolerance key {key!r}; choose from {', '.join(DIRECTION)}")
        table[key] = value
    return table


def within(key: str, value: float, limit: float | None) -> bool:
    """Whether `value` of metric `key` passes `limit` (None: not gated, always passes)."""
    if limit is None:
        return True
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value <= limit if DIRECTION[key] == "max" else value >= limit
