"""tools/plot.py: metrics.jsonl -> a PNG, tolerant of what a killed run leaves behind; one colour per
run, the runs and their settings in the title, the PNG beside the metrics."""
import json

import pytest

from tools import plot


def test_read_metrics_skips_a_cut_line_and_nulls(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "reward": 0.5, "kl": None}) + "\n" + '{"step": 2, "rew')
    assert plot.read_metrics(path) == [{"step": 1, "reward": 0.5, "kl": None}]


def _run(folder, rows, **config):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


ROWS = [{"step": s, "reward": 0.1 * s, "reward/positive": 9.5, "reward/negative": -9.5, "kl": 0.01 * s,
         "cos_between_texts": 0.9, "cos_within_group": 0.95, "rationale_len": 10 - s, "empty_frac": 0.0}
        for s in range(1, 6)]


def test_plot_writes_a_png_beside_the_metrics(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py's optional extra (pip install matplotlib) is not installed")
    run = _run(tmp_path / "run", ROWS)
    assert plot.main([str(run)]) == 0
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert plot.main([str(run / "metrics.jsonl"), "--png", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()


def test_one_colour_per_run_in_every_panel_and_the_runs_in_the_title(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py's optional extra (pip install matplotlib) is not installed")
    a = _run(tmp_path / "run-a", ROWS, model="tiny-lm", objective="grpo", lr=3e-4, group_size=4, seed=0)
    b = _run(tmp_path / "run-b", ROWS, model="tiny-lm", objective="grpo", lr=1e-3, group_size=4, seed=1)
    runs = {"run-a": plot.read_metrics(a / "metrics.jsonl"), "run-b": plot.read_metrics(b / "metrics.jsonl")}
    fig = plot.plot(runs, tmp_path / "p.png", {"run-a": plot.read_settings(a), "run-b": plot.read_settings(b)})
    colours = {}  # run -> the colours its lines have, over all panels
    for ax in fig.axes:
        for line in ax.get_lines():
            if ":" in str(line.get_label()):
                colours.setdefault(line.get_label().split(":")[0], set()).add(line.get_color())
    assert set(colours) == {"run-a", "run-b"}
    assert all(len(c) == 1 for c in colours.values()) and colours["run-a"] != colours["run-b"]
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    total = fig.axes[titles.index("total reward (optimised)")]  # the optimised reward alone on its axis
    assert {line.get_label().split(": ")[1] for line in total.get_lines()} == {"reward"}
    title = fig._suptitle.get_text()
    assert "run-a" in title and "run-b" in title and "lr 0.0003" in title and "seed 1" in title


def test_sts_on_the_old_and_the_new_scale_is_drawn_x100(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py's optional extra (pip install matplotlib) is not installed")
    old = _run(tmp_path / "old", [{"step": 2, "reward": 0.1, "sts_dev_spearman": 0.5}])
    new = _run(tmp_path / "new", [{"step": 2, "reward": 0.1, "sts_dev": 61.0}])
    runs = {"old": plot.read_metrics(old / "metrics.jsonl"), "new": plot.read_metrics(new / "metrics.jsonl")}
    fig = plot.plot(runs, tmp_path / "p.png")
    sts = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("STS"))
    assert {line.get_label(): list(line.get_ydata()) for line in sts.get_lines()} == {
        "old: sts_dev": [50.0], "new: sts_dev": [61.0]}


def test_a_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
