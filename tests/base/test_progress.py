"""edgellama.progress: plain step lines off a terminal, a live bar with elapsed time and an estimate
on one (forced here by `bar=`, and detected on a real pseudo-terminal), timings kept either way."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import time

import pytest

from edgellama.progress import SILENT, Progress


def test_plain_lines_when_not_a_terminal():
    buf = io.StringIO()
    p = Progress(stream=buf)
    assert p.bar is False
    with p.step("load", total=3) as step:
        step.advance(3)
        p.note("halfway")
    assert buf.getvalue().splitlines()[:2] == ["[edgellama] load ...", "[edgellama] halfway"]
    assert re.fullmatch(r"\[edgellama\] load: done \(\d+\.\d s\)", buf.getvalue().splitlines()[2])
    assert "\r" not in buf.getvalue()
    assert [s["step"] for s in p.steps] == ["load"] and step.done == 3


def test_forced_bar_counts_elapsed_and_estimate():
    buf = io.StringIO()
    p = Progress(stream=buf, bar=True, tick_s=0.02)
    with p.step("quantize", total=4) as step:
        for i in range(4):
            time.sleep(0.12)    # past tqdm's minimum redraw interval, so each count is drawn
            step.advance()
            if i == 1:
                p.note("a note above the bar")
    with p.step("opaque"):
        time.sleep(0.1)
    text = buf.getvalue()
    frames = text.split("\r")
    assert any(re.search(r"quantize #+ +[1-4]/4 \d\d:\d\d elapsed, ~\d\d:\d\d left", f) for f in frames), text
    assert any("4/4" in f for f in frames)
    # without a total: elapsed only, redrawn by the ticker while nothing advances
    assert sum("opaque ... 00:00 elapsed" in f for f in frames) >= 2, text
    assert "[edgellama] a note above the bar\n" in text
    assert re.search(r"\r\[edgellama\] quantize: done \(\d+\.\d s\)\n", text), text
    assert re.search(r"\r\[edgellama\] opaque: done \(\d+\.\d s\)\n", text), text
    assert [s["step"] for s in p.steps] == ["quantize", "opaque"]


def test_a_failed_step_prints_no_done_line_and_clears_the_bar():
    for bar in (False, True):
        buf = io.StringIO()
        p = Progress(stream=buf, bar=bar)
        with pytest.raises(ValueError):
            with p.step("write"):
                raise ValueError("disk full")
        assert "done" not in buf.getvalue() and p.steps == []
        p.note("after")   # no bar left behind: a note is a plain line again
        assert buf.getvalue().endswith("\r[edgellama] after\n" if bar else "[edgellama] after\n")


def test_silent_prints_and_keeps_nothing():
    with SILENT.step("x", total=2) as step:
        step.advance()
    assert SILENT.steps == []


def test_pseudo_terminal_is_detected():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            p = Progress(stream=stream)
            assert p.bar is True
            with p.step("bench", total=1) as step:
                step.advance()
        out = b""
        while select.select([master], [], [], 0.2)[0]:
            out += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    text = out.decode()
    assert "\r[edgellama] bench" in text and "0/1" in text and "elapsed" in text, text
    assert "[edgellama] bench: done" in text


def test_track_counts_each_item():
    buf = io.StringIO()
    p = Progress(stream=buf, bar=True, tick_s=10)
    seen = []
    for item in p.track(["a", "b", "c"], "score 3 windows"):
        seen.append(item)
        time.sleep(0.12)    # past tqdm's minimum redraw interval, so each count is drawn
    assert seen == ["a", "b", "c"]
    assert "1/3" in buf.getvalue() and "2/3" in buf.getvalue()
    assert [s["step"] for s in p.steps] == ["score 3 windows"]
