"""Watch GRACE learn on a laptop: tiny-lm on the SNLI triplets, base model vs three ways to train it.

    python bench/learning.py                  # 3 seeds x 3 trainings + the base model: 11 min on 2 busy CPU cores
    python bench/learning.py --seeds 1 --runs release --no-base --train-args="--lr 1e-4"   # one quick try (~2 min)

The runs (every trained one: same data, same steps x batch size, so EQUAL EXAMPLES; one row per run, 3 seeds):
- base:          the model as shipped, no training
- GRACE release: GRPO on rationales with the authors' reward (train.py's default)
- GRACE infonce: GRPO with --reward infonce (a per-rollout contrastive reward)
- contrastive:   --objective contrastive: InfoNCE on the same pooled embeddings, gradients through the
                 encoder (greedy rationales); not GRACE, the baseline the paper does not run
- release + std: (--ablation) the release reward with advantages divided by the group std
Every other setting is train.py's preset for the model (plus --train-args).

The columns, all measured after training on the final model, greedy rationales (evaluate.encode_texts):
- STS-B dev:    Spearman x100 of cos(h1, h2) vs the gold score on the first --pairs pairs of STS-B dev
                (measuring only: nothing trains on it), mean +- sd over seeds
- cos between:  mean cosine between the embeddings of different texts (those STS texts): near 1 = collapse
- ppl:          teacher-forced token perplexity (evaluate.perplexity) of the last --ppl-lines lines of
                wordnet_examples.txt that pretrain.py's default split held out of tiny-lm's training
                (the last lines of the file when pretrain.py is absent): does the policy stay a language model?
- rationale:    mean rationale length in tokens (stop token excluded) on the STS texts, and the share of
                empty rationales (a policy that writes nothing dodges the length penalty: the known hack)
- reward:       GRPO runs: the mean training reward of the first and of the last quarter of the steps
- min:          minutes of training per run (evaluation not included)
The base row uses the trained runs' rationale budget (max_new_tokens from their grace.json).
The table goes to stdout and to OUT/learning.md; each run's row to OUT/rows.jsonl, its model to OUT/RUN/seed-S.
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SNLI, STS_DEV = DATA / "snli_triplets" / "triplets.jsonl", DATA / "stsbenchmark" / "dev.jsonl"
WORDNET = DATA / "unsup_sentences" / "wordnet_examples.txt"
RUNS = {"GRACE release": [], "GRACE infonce": ["--reward", "infonce"], "contrastive": ["--objective", "contrastive"]}
ABLATION = {"release + std": ["--scale-adv-by-std"]}


def heldout_lines(n):
    """The last n lines of wordnet_examples.txt that tiny-lm did not train on (pretrain.py's default split)."""
    lines = [x.strip() for _, x in data.read_lines(WORDNET) if x.strip()]
    try:
        import pretrain
        held = set(pretrain.split_lines(pretrain.read_lines(WORDNET.parent), 2000, 0)[1])
        lines = [x for x in lines if x in held]
    except ImportError:
        pass
    return lines[-n:]


def measure(model_path, pairs, ppl_texts, max_new=None):
    """-> dict of the table's columns for one model (greedy rationales as long as it was trained with)."""
    from scipy.stats import spearmanr

    info = Path(model_path) / "grace.json"
    max_new = max_new or json.loads(info.read_text())["max_new_tokens"]
    rows = [json.loads(line) for line in STS_DEV.read_text().splitlines()[:pairs]]
    model, tok = policy.load(model_path)
    stats = {}
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    e = torch.from_numpy(evaluate.encode_texts(model, tok, texts, batch_size=32, max_new_tokens=max_new, stats=stats))
    n = len(e)
    return dict(sts=100 * spearmanr((e[:pairs] * e[pairs:]).sum(-1), [r["score"] for r in rows]).statistic,
                cos=((e.sum(0) @ e.sum(0) - n) / (n * (n - 1))).item(),
                ppl=evaluate.perplexity(model, tok, ppl_texts),
                len=stats["tokens"] / stats["texts"], empty=stats["empty"] / stats["texts"])


def train_and_measure(model, label, extra, seed, args, ppl_texts):
    out = Path(args.out) / label.replace(" ", "").replace("+", "_") / f"seed-{seed}"
    shutil.rmtree(out, ignore_errors=True)  # the bench's own scratch folder: a rerun replaces it
    t = time.perf_counter()
    train.main(["--model", model, "--data", str(SNLI), "--seed", str(seed), "--out", str(out), "--threads",
                str(args.threads), "--log-rationales", "0", "--save-every", "1000000", "--keep-last", "1",
                *(["--steps", str(args.steps)] if args.steps else []), *extra, *args.train_args.split()])
    minutes = (time.perf_counter() - t) / 60
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(m) // 4)  # the training reward, first and last quarter: did it move at all?
    trend = {f"reward_{w}": statistics.fmean(r.get("reward", float("nan")) for r in rs)
             for w, rs in (("first", m[:k]), ("last", m[-k:]))}
    return dict(run=label, seed=seed, minutes=minutes, **trend, **measure(out / "final", args.pairs, ppl_texts))


def table(rows, args, model):
    def ms(rs, key, fmt):
        xs = [r[key] for r in rs]
        return fmt.format(statistics.fmean(xs)) + (f" ± {fmt.format(statistics.stdev(xs))}" if len(xs) > 1 else "")

    runs = list(dict.fromkeys(r["run"] for r in rows))
    head = (f"{model} on SNLI triplets, {args.steps or 'preset'} steps x the preset batch (equal examples), "
            f"{args.seeds} seed(s), mean ± sd. STS-B dev: first {args.pairs} pairs, greedy rationales.\n\n"
            "| run | STS-B dev ρ×100 | cos between texts | held-out ppl | rationale tokens | empty | reward first→last | min |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for run in runs:
        rs = [r for r in rows if r["run"] == run]
        reward = "—" if run == "base" or "contrastive" in run else \
            f"{statistics.fmean(r['reward_first'] for r in rs):.3f}→{statistics.fmean(r['reward_last'] for r in rs):.3f}"
        lines.append(f"| {run} | {ms(rs, 'sts', '{:.1f}')} | {ms(rs, 'cos', '{:.3f}')} | {ms(rs, 'ppl', '{:.1f}')} | "
                     f"{ms(rs, 'len', '{:.1f}')} | {100 * statistics.fmean(r['empty'] for r in rs):.0f}% | {reward} | "
                     f"{'—' if run == 'base' else ms(rs, 'minutes', '{:.1f}')} |")
    return head + "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-lm")
    p.add_argument("--steps", type=int, default=30, help="training steps of every run (0: the preset's)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=200, help="STS-B dev pairs measured (of 1500)")
    p.add_argument("--ppl-lines", type=int, default=200)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the trained runs")
    p.add_argument("--ablation", action="store_true", help="also: release reward + advantages / group std")
    p.add_argument("--no-base", action="store_true", help="skip the base-model row")
    p.add_argument("--train-args", default="",
                   help="extra train.py flags for every run, e.g. --train-args='--lr 1e-4 --no-length-penalty'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out/learning")
    args = p.parse_args()
    if not SNLI.exists() or not STS_DEV.exists():
        raise SystemExit(f"needs {SNLI} and {STS_DEV} (the shared data beside the repo)")
    torch.set_num_threads(args.threads)
    start, ppl_texts = time.perf_counter(), heldout_lines(args.ppl_lines)
    wanted = [w.strip() for w in args.runs.split(",") if w.strip()]  # a run is picked by any part of its name
    runs = {k: v for k, v in RUNS.items() if any(w in k for w in wanted)} | (ABLATION if args.ablation else {})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for label, extra in runs.items():
        for seed in range(args.seeds):
            rows.append(train_and_measure(args.model, label, extra, seed, args, ppl_texts))
            with open(Path(args.out) / "rows.jsonl", "a") as f:
                f.write(json.dumps({**rows[-1], "train_args": args.train_args, "steps": args.steps}) + "\n")
    if not args.no_base:  # the base model with the trained runs' rationale budget (else its preset's)
        done = sorted(Path(args.out).glob("*/seed-*/final/grace.json"))
        max_new = json.loads(done[0].read_text())["max_new_tokens"] if rows and done else \
            train.PRESETS[train.default_preset(args.model)]["max_new_tokens"]
        rows.insert(0, dict(run="base", seed=0, minutes=0, **measure(args.model, args.pairs, ppl_texts, max_new)))
    text = table(rows, args, args.model) + f"\nWall time: {(time.perf_counter() - start) / 60:.1f} min.\n"
    print("\n" + text)
    (Path(args.out) / "learning.md").write_text(text)


if __name__ == "__main__":
    main()
