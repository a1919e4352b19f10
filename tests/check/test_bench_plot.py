"""bench --plot's chart: titled, labelled axes, each bar's value written on it, and a bandwidth
bound far above the bars drawn at the top edge with its value instead of stretching the axis."""

from __future__ import annotations

import pytest

from edgellama.check.bench import Row, figure, plot

pytest.importorskip("matplotlib")


def row(name: str, speed: float, bound: float) -> Row:
    return Row(name=name, precision="fp32", weight_bytes=600_000, prefill_ms=1.0, decode_tokens_per_s=speed, runs=1,
               bound_tokens_per_s=bound, fraction_of_bound=speed / bound if bound else 0.0)


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def test_far_bound_does_not_squash_the_bars():
    import matplotlib.pyplot as plt

    rows = [row("edgellama (ort, static)", 200.0, 16000.0), row("transformers eager", 20.0, 16000.0)]
    fig = figure(rows, title="tiny, 16 new tokens")
    ax = fig.axes[0]
    try:
        assert "decode speed" in ax.get_title() and "tiny, 16 new tokens" in ax.get_title()
        assert ax.get_xlabel() and "tokens / s" in ax.get_ylabel()
        # the axis follows the bars, not the bound: the tallest bar fills most of it
        assert 200.0 / ax.get_ylim()[1] > 0.6
        assert "200.0 tok/s\n1% of bound" in texts(fig) and "20.0 tok/s\n0.1% of bound" in texts(fig)
        assert texts(fig).count("bound 16,000 tok/s") == 2
        assert [t.get_text() for t in ax.get_xticklabels()][0].startswith("edgellama\n(ort, static)")
    finally:
        plt.close(fig)


def test_near_bound_is_drawn_at_its_value():
    import matplotlib.pyplot as plt

    fig = figure([row("edgellama (ort, static)", 30.0, 35.0)])
    ax = fig.axes[0]
    try:
        assert ax.get_ylim()[1] >= 35.0
        (marks,) = ax.collections          # one scatter of bound marks, at the bound's height
        assert marks.get_offsets()[0][1] == pytest.approx(35.0)
        assert not any(t.startswith("bound ") for t in texts(fig))
        assert "30.0 tok/s\n86% of bound" in texts(fig)
    finally:
        plt.close(fig)


def test_plot_writes_a_png(tmp_path):
    path = plot([row("a", 10.0, 0.0)], tmp_path / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
