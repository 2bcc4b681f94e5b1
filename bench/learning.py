"""Does training move anything? Train tiny on the SNLI triplets and measure reward and STS before/after.

    python bench/learning.py [--steps 300] [--out bench_out/learning]

Reports, from the run's own metrics.jsonl: the mean reward of the first and last 50 steps, the
collapse diagnostic (mean cosine between embeddings of different texts), and the STS Benchmark dev
Spearman (a fixed slice, greedy rationales, through evaluate.py's encoder) of the initial and the
final model. The same helpers serve bench/ablation.py.

tiny is a random model: it almost never writes EOS within the token budget, so with the release's
length penalty every reward would be -1 and the only thing left to learn would be "stop earlier".
These runs pass --no-length-penalty so that the contrastive terms are what is optimised.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

SNLI = ROOT.parent / "shared" / "data" / "snli_triplets" / "triplets.jsonl"
STS_DEV = ROOT.parent / "shared" / "data" / "stsbenchmark" / "dev.jsonl"
COMMON = ["--data", str(SNLI), "--batch-size", "8", "--group-size", "4", "--mini-batch-size", "4",
          "--max-new-tokens", "16", "--no-length-penalty", "--log-rationales", "0", "--save-every", "1000"]


def sts_spearman(model_path, pairs=300, max_new_tokens=16):
    """Spearman x 100 of cos(h1, h2) vs the gold scores on the first `pairs` STS-B dev pairs."""
    from scipy.stats import spearmanr

    rows = [json.loads(line) for line in STS_DEV.read_text().splitlines()[:pairs]]
    model, tok = policy.load(model_path)
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    e = evaluate.encode_texts(model, tok, texts, batch_size=32, max_new_tokens=max_new_tokens)
    cos = (e[:len(rows)] * e[len(rows):]).sum(-1)
    return 100 * spearmanr(cos, [r["score"] for r in rows]).statistic


def train_and_measure(label, extra, steps, out, window=50):
    """One training run -> a dict of the table's columns."""
    t = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)  # the bench's own scratch folder: a rerun replaces it
    train.main([*COMMON, *extra, "--steps", str(steps), "--out", str(out)])
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    w = min(window, len(m) // 2)

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    return dict(run=label, reward_first=mean("reward", m[:w]), reward_last=mean("reward", m[-w:]),
                collapse_first=mean("cos_between_texts", m[:w]), collapse_last=mean("cos_between_texts", m[-w:]),
                within_group=mean("cos_within_group", m[-w:]), within_pos=mean("within_share/positive", m[-w:]),
                adv=mean("adv_abs", m[-w:]), sts_after=sts_spearman(str(out / f"step-{steps}")),
                minutes=(time.perf_counter() - t) / 60)


def print_table(rows, sts_before, steps, window=50):
    print(f"\ntiny on SNLI triplets, {steps} steps; windows of {min(window, steps // 2)} steps; "
          f"STS-B dev Spearman x100 (300 pairs, greedy 16-token rationales): initial model {sts_before:.1f}")
    cols = ["run", "reward first", "reward last", "cos between texts first", "cos between texts last",
            "cos within group last", "within-group share of s_pos", "mean abs advantage", "STS after", "minutes"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['run']} | {r['reward_first']:.3f} | {r['reward_last']:.3f} | {r['collapse_first']:.4f} | "
              f"{r['collapse_last']:.4f} | {r['within_group']:.4f} | {r['within_pos']:.3f} | {r['adv']:.4f} | "
              f"{r['sts_after']:.1f} | {r['minutes']:.1f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="bench_out/learning")
    p.add_argument("--lr", default="3e-4", help="tiny's default; the release's 1e-6 moves nothing in minutes")
    args = p.parse_args()
    if not SNLI.exists() or not STS_DEV.exists():
        raise SystemExit(f"needs {SNLI} and {STS_DEV} (the shared data beside the repo)")
    before = sts_spearman("tiny")
    rows = [train_and_measure(f"release reward, lr {args.lr}", ["--lr", args.lr], args.steps, Path(args.out))]
    print_table(rows, before, args.steps)


if __name__ == "__main__":
    main()
