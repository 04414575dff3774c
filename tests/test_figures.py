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
            {"T": t, "batch": 64 // t, "transformer_ms": t * 0.1, "lstm_ms": t * 0.2, "lstm_critical_path": t + 1,
             "transformer_critical_path": 2} for t in (16, 32)],
            "forward_one": {"rows": [{"T": t, "transformer_ms": 1.0, "lstm_ms": t * 0.05} for t in (16, 32)]}},
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


def test_study_replot_renders_wide_from_a_small_record(tmp_path):
    pytest.importorskip("ml_collections")
    from experiments import results, study

    results.write(tmp_path / "results" / "study.json", _study_record())
    study.replot(tmp_path / "figs", tmp_path / "results" / "study.json")  # --replot: nothing measured
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(n for n, _ in study.PLOTS.values())
    for name, _ in study.PLOTS.values():
        assert plotstyle.png_size(tmp_path / "figs" / name)[0] >= plotstyle.MIN_WIDTH_PX, name
    assert "Conditions: machine Test CPU" in (tmp_path / "results" / "study.md").read_text()
    with pytest.raises(ValueError, match="--replot: no record at"):
        study.replot(tmp_path / "figs", tmp_path / "missing.json")

def _curve(final: dict) -> dict:
    return {"conditions": CONDITIONS, "final": {"step": 20, **final},
            "train": [{"step": s, "loss": 3.0 / s} for s in (5, 10, 15, 20)],
            "eval": [{"step": s, "loss": 3.5 / s} for s in (10, 20)]}


def test_figure_functions_render_wide_from_small_records(tmp_path):
    from experiments import figures

    figures.plot_curves(_curve({"bits_per_byte": 1.9}), _curve({"exact_match": 0.9, "bleu": 95.0}),
                        tmp_path / "curves.png")
    model = {"d_model": 16, "num_layers": 1, "num_heads": 2}
    rows = [{"what": f"{w}_step", "variant": v, "seq_len": t, "ms": t / 10, "temp_bytes": t * 2**10, "model": model}
            for w, vs in (("decoder", ("dense", "window64")), ("encoder", ("dense", "nystrom32")))
            for v in vs for t in (64, 128)]
    figures.plot_variants({"conditions": CONDITIONS, "rows": rows}, tmp_path / "variants.png")
    figures.plot_schedule(figures.schedule_record(), tmp_path / "schedule.png")
    for name in ("curves", "variants", "schedule"):
        assert plotstyle.png_size(tmp_path / f"{name}.png")[0] >= plotstyle.MIN_WIDTH_PX, name


def test_weight_placement_is_read_from_the_shardings_and_drawn(tmp_path):
    """The record holds what jax's shardings put on each device: under tp on (data 2, tensor 2), wq's head
    columns split by the tensor coordinate, the embedding's vocab rows too, norms replicated."""
    import json

    from experiments import figures

    figures.placement_worker(str(tmp_path / "p.json"))
    rec = json.loads((tmp_path / "p.json").read_text())
    tp = next(m for m in rec["meshes"] if m["preset"] == "tp")
    w = {x["name"]: x for x in tp["weights"]}
    for d, where in tp["devices"].items():
        half = where["tensor"]
        assert w["blocks.layers.attn.wq"]["held"][d][2] == [2 * half, 2 * half + 2]  # 4 heads, 2 per tensor shard
        assert w["embed.table"]["held"][d][0] == [16 * half, 16 * half + 16]  # vocab 32
        assert w["final_norm.scale"]["held"][d] == [[0, 16]]
        assert figures._held_box(w["blocks.layers.attn.wq"], d) == (0.5 * half, 0.5 * half + 0.5, 0.0, 1.0)
    assert figures._split_words(w["blocks.layers.attn.wq"]) == "heads over tensor"
    figures.plot_placement(rec | {"conditions": CONDITIONS}, tmp_path / "placement.png")
    assert plotstyle.png_size(tmp_path / "placement.png")[0] >= plotstyle.MIN_WIDTH_PX


def test_curve_record_transcribes_a_runs_metrics(tmp_path):
    import json

    from experiments import figures

    lines = [{"step": 10, "split": "train", "time": 100.0, "loss": 3.0, "tokens_per_s": 5.0},
             {"step": 10, "split": "eval", "time": 101.0, "loss": 3.2, "bits_per_byte": 4.6, "perplexity": 24.0},
             {"step": 20, "split": "train", "time": 102.0, "loss": 2.0, "tokens_per_s": 6.0},
             {"step": 20, "split": "train", "time": 110.0, "loss": 1.9, "tokens_per_s": 6.5}]  # resumed: later wins
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 2')
    (tmp_path / "final_metrics.json").write_text(json.dumps({"step": 20, "loss": 2.1, "bits_per_byte": 3.03}))
    rec = figures.curve_record("lm_tiny", tmp_path, "python experiments/train.py ...", 12.0)
    assert rec["train"] == [{"step": 10, "loss": 3.0, "tokens_per_s": 5.0},
                            {"step": 20, "loss": 1.9, "tokens_per_s": 6.5}]
    assert rec["eval"] == [{"step": 10, "loss": 3.2, "bits_per_byte": 4.6},
                           {"step": 20, "loss": 2.1, "bits_per_byte": 3.03}]  # the final eval is the last point
    assert rec["final"]["bits_per_byte"] == 3.03 and rec["train_seconds"] == 10.0
    assert rec["conditions"]["command"] == "python experiments/train.py ..." and rec["conditions"]["run_wall_s"] == 12.0
