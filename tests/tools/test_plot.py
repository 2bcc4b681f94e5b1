"""tools/plot.py: metrics.jsonl -> a PNG, tolerant of what a killed run leaves behind."""
import json

import pytest

from tools import plot


def test_read_metrics_skips_a_cut_line_and_nulls(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "reward": 0.5, "kl": None}) + "\n" + '{"step": 2, "rew')
    assert plot.read_metrics(path) == [{"step": 1, "reward": 0.5, "kl": None}]


def test_plot_writes_a_png_with_the_panels_that_have_data(tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py's optional extra (pip install matplotlib) is not installed")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward": 0.1 * s, "cos_between_texts": 0.9, "rationale_len": 10 - s, "empty_frac": 0.0}
            for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.main([str(run)]) == 0
    png = (run / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
