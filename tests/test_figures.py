"""Figures under docs/: every PNG is at least 1,200 px wide, and each plot function renders from a small
record (study.py's parts, experiments/figures.py's pictures) at that width."""

import math
from pathlib import Path

import pytest

from experiments import plotstyle

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"machine": "Test CPU, 2 CPU cores", "load": [0.0], "jax": "0", "date": "2026-01-01", "command": "t"}


def test_every_png_under_docs_is_at_least_1200_px_wide():
    pngs = sorted((ROOT / "docs").rglob("*.png"))
    assert pngs, "no PNG under docs/"
    narrow = {str(p.relative_to(ROOT)): plotstyle.png_size(p) for p in pngs
              if plotstyle.png_size(p)[0] < plotstyle.MIN_WIDTH_PX}
    assert not narrow, f"PNGs narrower than {plotstyle.MIN_WIDTH_PX} px (width, height): {narrow}"


def test_png_size_reads_the_header(tmp_path):
    plt = plotstyle.pyplot()
    fig = plt.figure(figsize=(8, 2))
    fig.savefig(tmp_path / "x.png", dpi=150)
    plt.close(fig)
    assert plotstyle.png_size(tmp_path / "x.png") == (1200, 300)
    (tmp_path / "y.png").write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(ValueError, match="is not a PNG"):
        plotstyle.png_size(tmp_path / "y.png")


def test_a_narrow_figure_is_refused(tmp_path):
    plt = plotstyle.pyplot()
    with pytest.raises(ValueError, match="750 px wide; make the figure at least 8.0 in wide"):
        plotstyle.save(plt.figure(figsize=(5, 3)), tmp_path / "narrow.png")
    assert not (tmp_path / "narrow.png").exists()


@pytest.mark.parametrize("value, text", [(600, "600"), (1024, "1,024"), (0.5, "0.5"), (0.002, "0.002"),
                                         (2.5, "2.5"), (0, "0")])
def test_tick_labels_are_plain_numbers(value, text):
    assert plotstyle.plain(value) == text


def _study_record() -> dict:
    model = {"params": 1000}
    return {
        "a": {"transformer": model, "lstm": model, "tokens_per_step": 64, "rows": [
            {"T": t, "batch": 64 // t, "transformer_ms": t * 0.1, "lstm_ms": t * 0.2, "transformer_latency_ms": 1.0,
             "lstm_latency_ms": t * 0.05, "lstm_critical_path": t + 1, "transformer_critical_path": 2}
            for t in (16, 32)]},
        "b": {"rows": [{"position": p, "cached_ms": 0.1, "uncached_ms": 0.1 * p, "rnn_ms": 0.1} for p in (1, 16)]},
        "c": {"seconds_lm": 1.0, "seconds_numbers": 1.0, **{
            f"{task}_{name}": {"steps": 3, "curve": [[0.1, 5.0], [0.5, 3.0]], "bits_per_byte": 3.5 / math.log(2),
                               "exact_match": 0.5, "bleu": 10.0}
            for task in ("lm", "numbers") for name in ("transformer", "rnn")}},
        "d": {"rows": [{"model": "tiny", "params": 10**6, "devices": n, "preset": p, "batch": 8, "seq_len": 64,
                        "state_bytes": 2**20 / n, "peak_bytes": 2**21, "collective_bytes": 2**20 * (n > 1),
                        "mesh": {"data": n}}
                       for n in (1, 2) for p in ("dp", "fsdp", "sp")]},
        "conditions": CONDITIONS}


def test_study_plots_render_wide_from_a_small_record(tmp_path):
    pytest.importorskip("ml_collections")
    from experiments import study

    record = _study_record()
    study.write_report(record, tmp_path / "figs", tmp_path / "results" / "study.json")
    for name, _ in study.PLOTS.values():
        assert plotstyle.png_size(tmp_path / "figs" / name)[0] >= plotstyle.MIN_WIDTH_PX, name
    assert "Conditions: machine Test CPU" in (tmp_path / "results" / "study.md").read_text()
    # --replot: the same PNGs again from the saved record, nothing measured
    for name, _ in study.PLOTS.values():
        (tmp_path / "figs" / name).unlink()
    study.replot(tmp_path / "figs", tmp_path / "results" / "study.json")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(n for n, _ in study.PLOTS.values())
    with pytest.raises(ValueError, match="--replot: no record at"):
        study.replot(tmp_path / "figs", tmp_path / "missing.json")
