"""bench/learning.py's own logic, without training: the paired test against a formula by hand,
the tuning choice (the best --val score of each run's grid, on the tuning seed only) and the
validation sample (seeded, checked against --val's own lines)."""
import importlib.util
import json
import math
import random
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
sys.modules["learning"] = learning
spec.loader.exec_module(learning)


def test_paired_p_is_the_paired_t_test_by_hand():
    from scipy.stats import t as student

    ref, mine = [5.0, 7.0, 6.5, 9.0, 4.0], [6.0, 9.5, 6.0, 12.0, 5.5]
    rows = [dict(run=r, seed=s, sts=v) for r, xs in (("GRACE release", ref), ("other", mine))
            for s, v in enumerate(xs)]
    rows.insert(3, dict(run="other", seed=9, sts=100.0))  # a seed GRACE lacks: not paired
    d = [a - b for a, b in zip(mine, ref)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    p = 2 * student.sf(abs(mean / (sd / math.sqrt(5))), 4)
    assert learning.paired_p(rows, "other") == f"{p:.3f}"
    assert learning.paired_p(rows, "GRACE release") == "—"


def test_tune_keeps_the_best_val_score_of_each_grid(tmp_path, monkeypatch):
    seen = []

    def fake_run(model, out, extra, seed, args, eval_every):  # best at lr 1e-4, 4 steps
        seen.append((seed, extra, eval_every))
        lr, k = float(extra[extra.index("--lr") + 1]), extra.count("4") + 1
        return 0.1, [{"sts_dev": -1.0}, {"sts_dev": -abs(math.log10(lr) + 4) + k}]

    monkeypatch.setattr(learning, "train_run", fake_run)
    runs = {"GRACE release": [], "contrastive": ["--objective", "contrastive"]}
    chosen = learning.tune("tiny-lm", runs, Namespace(out=str(tmp_path), jobs=1, steps=30,
                                                      eval_every=10))
    assert chosen == {"GRACE release": ["--lr", "1e-4"],
                      "contrastive": ["--lr", "1e-4", "--ppo-epochs", "4"]}
    assert {s for s, _, _ in seen} == {learning.TUNE_SEED} and len(seen) == 3 + 6
    assert {e for _, _, e in seen} == {30}  # one --val check, at the last step
    assert json.loads((tmp_path / "tuned.json").read_text())["chosen"] == chosen


def test_val_sample_is_a_seeded_draw_and_a_bad_row_names_the_val_file(tmp_path):
    rows = [dict(sentence1=f"a {i}", sentence2=f"b {i}", score=i % 5) for i in range(40)]
    val = tmp_path / "train.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = Namespace(val=val, val_pairs=12, out=str(tmp_path))
    drawn = [json.loads(x) for x in learning.val_sample(args).read_text().splitlines()]
    want = random.Random(0).sample([(r["sentence1"], r["sentence2"], float(r["score"]))
                                    for r in rows], 12)
    assert [(r["sentence1"], r["sentence2"], r["score"]) for r in drawn] == want
    val.write_text(val.read_text() + '{"sentence1": "x", "score": 1}\n')
    with pytest.raises(learning.data.DataError, match=f"{re.escape(str(val))}:41.*sentence2"):
        learning.val_sample(args)
