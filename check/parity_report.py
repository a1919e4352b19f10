"""Parity reports for people: a terminal table and GitHub-flavoured markdown (CI job summaries).

Both render the JSON report of `parity.run_parity` (docs/parity-schema.md) and nothing else, so
what a CI log shows is exactly what the JSON file records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellama.errors import EdgellamaError
from edgellama.folder import json_safe

_COLS = (("max_abs", "max abs"), ("max_rel", "max rel"), ("p999_abs", "p99.9 abs"), ("cosine", "cosine"),
         ("kl_mean", "KL mean"), ("kl_max", "KL max"), ("top1", "top-1"), ("top5", "top-5"))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0:
            return "0"
        if 0.9 <= value < 1.0 or value == 1.0:
            return f"{value:.6f}".rstrip("0").rstrip(".") if value != 1.0 else "1"
        return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def _grid(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def _metric_rows(c: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, m in (("logits prefill", c["logits"]["prefill"]), ("logits decode", c["logits"]["decode"])):
        if m:
            rows.append([label] + [fmt(m.get(k)) for k, _ in _COLS])
    kv = c.get("present_kv") or {}
    if kv:
        rows.append(["present KV"] + [fmt(kv.get(k)) for k, _ in _COLS[:4]] + ["-"] * 4)
    return rows


def _failed(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in c["checks"] if not x["pass"]]


def _check_text(x: dict[str, Any]) -> str:
    op = "<=" if x["direction"] == "max" else ">="
    return f"{x['quantity']} {x['metric']} = {fmt(x['value'])} (needs {op} {fmt(x['limit'])}, key {x['tolerance_key']})"


def _greedy_text(c: dict[str, Any]) -> str:
    g = c["greedy"]
    if g["first_divergence"] is None:
        return f"greedy: all {g['tokens_per_row']} tokens of every row identical"
    return (f"greedy: first divergence at step {g['first_divergence']} of {g['tokens_per_row']} "
            f"(worst row keeps {fmt(g['match_fraction'])} of its tokens)")


def _where_text(loc: dict[str, Any] | None) -> str | None:
    if not loc:
        return None
    first = loc.get("first_failing")
    if not first:
        return f"localization ({loc['batch']}): {loc['note']}"
    where = f"layer {first['layer']} " if first["layer"] is not None else ""
    name = first.get("candidate_name") or first.get("reference_name") or first["key"]
    return (f"first divergence: {where}{first['block']} ({first['op']}), node {name}: "
            f"max rel {fmt(first['max_rel'])} > block_rel {fmt(loc['block_rel'])}, cosine {fmt(first['cosine'])}")


def to_text(report: dict[str, Any]) -> str:
    """The terminal report: one metrics table per comparison, failed checks, greedy, localization."""
    out = [f"parity {report['status'].upper()}: {report['model']} vs {report['reference']} "
           f"({report['precision']} tolerances, {report['decode_steps']} decode steps, "
           f"{len(report['prompts'])} prompts, {report['seconds']:.1f} s)"]
    for c in report["comparisons"]:
        out += ["", f"[{c['provider']}] {c['candidate']}: {c['status'].upper()}"]
        out += ["  " + line for line in _grid(["", *(h for _, h in _COLS)], _metric_rows(c))]
        out.append("  " + _greedy_text(c))
        for x in _failed(c):
            out.append("  FAIL " + _check_text(x))
        where = _where_text(c.get("localization"))
        if where:
            out.append("  " + where)
    return "\n".join(out)


def to_markdown(report: dict[str, Any]) -> str:
    """A CI job summary ($GITHUB_STEP_SUMMARY): status, metrics table, failures, localization."""
    icon = "✅" if report["status"] == "pass" else "❌"
    out = [f"### {icon} edgellama parity: {report['status']}",
           "",
           f"`{report['model']}` vs `{report['reference']}` · {report['precision']} tolerances · "
           f"{report['decode_steps']} decode steps · {len(report['prompts'])} prompts · {report['seconds']:.1f} s",
           ""]
    for c in report["comparisons"]:
        out += [f"#### {c['provider']}: {c['status']}", "",
                "| | " + " | ".join(h for _, h in _COLS) + " |",
                "|---|" + "---:|" * len(_COLS)]
        out += ["| " + " | ".join(r) + " |" for r in _metric_rows(c)]
        out += ["", _greedy_text(c), ""]
        failed = _failed(c)
        if failed:
            out += ["| failed check | value | limit |", "|---|---:|---:|"]
            out += [f"| {x['quantity']} {x['metric']} (`{x['tolerance_key']}`) | {fmt(x['value'])} | "
                    f"{'≤' if x['direction'] == 'max' else '≥'} {fmt(x['limit'])} |" for x in failed]
            out.append("")
        where = _where_text(c.get("localization"))
        if where:
            out += [f"**{where}**", ""]
    out += [f"<details><summary>tolerances ({report['precision']})</summary>", "",
            report["tolerance_reason"], "",
            "| key | limit |", "|---|---:|"]
    out += [f"| `{k}` | {fmt(v)} |" for k, v in report["tolerances"].items()]
    out += ["", "</details>", ""]
    return "\n".join(out)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(json_safe(report), indent=2) + "\n"


def check_paths(*, json_path: Path | None = None, markdown_path: Path | None = None) -> None:
    """Refuse (EdgellamaError) a report path that cannot be written: its folder missing or not a
    folder, or the path itself a folder. Meant before a check runs, so a typo costs no check."""
    for flag, path in (("--json", json_path), ("--markdown", markdown_path)):
        if path is None:
            continue
        path = Path(path)
        parent = path.absolute().parent
        if not parent.exists():
            raise EdgellamaError(f"{flag} {path}: folder {parent} does not exist")
        if not parent.is_dir():
            raise EdgellamaError(f"{flag} {path}: {parent} is not a folder")
        if path.is_dir():
            raise EdgellamaError(f"{flag} {path} is a folder; give a file name")


def write(report: dict[str, Any], *, json_path: Path | None = None, markdown_path: Path | None = None) -> None:
    """Write the requested report files (markdown is appended, as CI summaries collect several jobs).
    A file that cannot be written is an EdgellamaError naming it."""
    check_paths(json_path=json_path, markdown_path=markdown_path)
    try:
        if json_path is not None:
            Path(json_path).write_text(to_json(report))
        if markdown_path is not None:
            with open(markdown_path, "a", encoding="utf-8") as f:
                f.write(to_markdown(report))
    except OSError as e:
        raise EdgellamaError(f"cannot write the parity report: {e}") from None
