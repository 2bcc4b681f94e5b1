"""Which objective makes the better encoder from tiny-lm at equal budget: GRACE vs contrastive.

    python bench/learning.py --snli DATA/snli_triplets/triplets.jsonl \
        --sts DATA/stsbenchmark/dev.jsonl --val DATA/stsbenchmark/train.jsonl \
        --wordnet DATA/unsup_sentences --scifact DATA/scifact --banking DATA/banking77 \
        --tune --jobs 2
                    # tune each run's lr on --val, then 5 seeds x each run + the base model
    python bench/learning.py ... --seeds 1 --runs release --no-base \
        --train-args="--lr 1e-4"          # one quick try (~3 min)

Tuning (--tune, needs --val): every run trains once per lr of its grid (LR_GRID; contrastive also
1 and 4 optimizer steps per batch) on a seed no reported run uses (TUNE_SEED), and keeps the
setting with the best Spearman at its last step on OUT/val.jsonl: --val-pairs pairs drawn (seed
0) from --val, STS Benchmark *train*, never an evaluation split (a sample, as the file's first
rows are all one genre). The choice is written to OUT/tuned.json and reused by later runs of the
bench. Seed 0 of every run logs the same Spearman every --eval-every steps: the learning curves
(OUT/curves.png, tools/plot.py: that signal, the cosine between texts and the KL against steps).
--jobs N trains N runs at a time, each in its own process with --threads threads.

The data (public sets; none ships with the repo, so each is an argument):
- --snli:    SNLI (https://nlp.stanford.edu/projects/snli/) as triplets, JSONL {anchor, positive
             (an entailment), hard_negative (a contradiction)}: what every run trains on
- --sts:     the STS Benchmark dev split (https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark),
             JSONL {sentence1, sentence2, score}: what every model is measured on
- --wordnet: the folder of the WordNet 3.0 (https://wordnet.princeton.edu/) example sentences and
             glosses, one a line (wordnet_examples.txt, wordnet_glosses.txt: what tools/pretrain.py
             --data-dir reads): the held-out perplexity lines
- --scifact: SciFact (https://github.com/allenai/scifact) in BEIR layout with its *train*
             judgements (qrels/train.tsv): a retrieval check no run trains on
- --banking: Banking77 (https://github.com/PolyAI-LDN/task-specific-datasets), train.csv and
             test.csv (text, category): a classification check

The runs (every trained one: same data, same steps x batch size, so EQUAL EXAMPLES; one row per
run, --seeds seeds):
- base:          the model as shipped, no training
- GRACE release: GRPO on rationales with the authors' reward (train.py's default)
- GRACE infonce: GRPO with --reward infonce (a per-rollout contrastive reward)
- contrastive:   --objective contrastive: InfoNCE on the same pooled embeddings, gradients
                 through the encoder (greedy rationales); not GRACE: the paper's "w/ CL
                 training" baseline in spirit, on this data
- GRACE + in-batch: the release reward plus the per-rollout in-batch term s_ib
                 (--in-batch-weight 1, reward.grace_rewards): the collapse cure that stays GRACE
- LoRA r8:       the GRACE release run with --lora-rank 8 adapters (base frozen, the KL reference
                 the adapters switched off)
- contrastive, equal time: contrastive given as many steps as take it the GRACE release run's
                 mean minutes (EQUAL WALL-CLOCK; its steps are cheaper)
- release + std: (--ablation) the release reward with advantages divided by the group std
Every other setting is train.py's preset for the model (plus --train-args).

The columns, all measured after training on the final model through evaluate.GraceEncoder
(greedy rationales as long as the model trained with):
- STS-B dev:    Spearman x100 of cos(h1, h2) vs the gold score on the first --pairs pairs of STS-B
                dev (measuring only: nothing trains on it), mean +- sd over seeds, and (p) the
                two-sided paired t-test (same seeds) against GRACE release; so the next two
- SciFact:      nDCG@10 x100 of evaluate.py's local retrieval task (--limit --sci-queries train
                queries, their judged abstracts and --sci-docs others)
- Banking77:    accuracy x100 of evaluate.py's local classification task (mteb's logistic
                regression, --limit --bank-rows rows of each split)
- cos between:  mean cosine between the embeddings of different texts (the STS texts): near 1 =
                collapse
- ppl:          teacher-forced token perplexity (diagnostics.perplexity) of the last --ppl-lines
                lines of wordnet_examples.txt that tools/pretrain.py's default split held out of
                tiny-lm's training (the last lines of the file when tools/pretrain.py is absent):
                does the policy stay a language model?
- rationale:    mean rationale length in tokens (stop token excluded) on the STS texts, and the
                share of empty rationales (a policy that writes nothing dodges the length penalty:
                the known hack)
- reward:       GRPO runs: the mean training reward of the first and of the last quarter of the
                steps
- steps, min:   batches trained on, and minutes of training (seed 0's --val checks included, the
                final measurement not; with --jobs 2 two runs share the machine)
The base row uses the trained runs' rationale budget (max_new_tokens from their grace.json).
The table goes to stdout and to OUT/learning.md; each run's row to OUT/rows.jsonl, its model to
OUT/RUN/seed-S.
"""
import argparse
import json
import multiprocessing
import random
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from infra import cli, data, diagnostics, mteb_tasks  # noqa: E402
import evaluate  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

# flag -> (what it names, the file it must hold, the public data set it comes from); no defaults:
# the data is not in the repo
DATA = {
    "snli": ("FILE", None, "SNLI triplets as JSONL (anchor, positive, hard_negative), made from "
             "SNLI, published at https://nlp.stanford.edu/projects/snli/"),
    "sts": ("FILE", None, "the STS Benchmark dev split as JSONL (sentence1, sentence2, score), "
            "published at https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark"),
    "wordnet": ("DIR", "wordnet_examples.txt", "the folder of the WordNet 3.0 example sentences "
                "and glosses, one a line (wordnet_examples.txt, wordnet_glosses.txt), WordNet "
                "published at https://wordnet.princeton.edu/"),
    "scifact": ("DIR", "qrels/train.tsv", "SciFact in BEIR layout (corpus.jsonl, queries.jsonl, "
                "qrels/train.tsv), published at https://github.com/allenai/scifact"),
    "banking": ("DIR", "test.csv", "Banking77 as train.csv and test.csv (text, category), "
                "published at https://github.com/PolyAI-LDN/task-specific-datasets"),
}
WORDNET_EXAMPLES = "wordnet_examples.txt"
RUNS = {"GRACE release": [], "GRACE infonce": ["--reward", "infonce"],
        "GRACE + in-batch": ["--in-batch-weight", "1"],
        "contrastive": ["--objective", "contrastive"], "LoRA r8": ["--lora-rank", "8"]}
ABLATION = {"release + std": ["--scale-adv-by-std"]}
EQUAL_TIME = "contrastive, equal time"
TUNE_SEED = 100  # the tuning runs' seed: no reported run uses it
LR_GRID = {"LoRA r8": ["1e-4", "1e-3", "3e-3"], "contrastive": ["3e-5", "1e-4", "3e-4"]}
DEFAULT_GRID = ["3e-5", "1e-4", "3e-4"]


def check_data(args):
    """Every data argument given and there, else one line naming those that are not (exit 2)."""
    missing = []
    for flag, (kind, inside, source) in DATA.items():
        path = getattr(args, flag)
        file = path / inside if inside and path is not None else path
        if path is None:
            missing.append(f"--{flag} {kind}: {source}")
        elif not file.is_file():
            missing.append(f"--{flag} {kind} ({file} is not a file): {source}")
    if missing:
        print(f"bench/learning.py needs {'; '.join(missing)}", file=sys.stderr)
        sys.exit(2)


def heldout_lines(wordnet, n):
    """The last n lines of wordnet_examples.txt that tiny-lm did not train on (tools/pretrain.py's
    default split of the folder `wordnet`)."""
    lines = [x.strip() for _, x in data.read_lines(wordnet / WORDNET_EXAMPLES) if x.strip()]
    try:
        from tools import pretrain
        held = set(pretrain.split_lines(pretrain.read_lines(wordnet), 2000, 0)[1])
        lines = [x for x in lines if x in held]
    except ImportError:
        pass
    return lines[-n:]


def val_sample(args):
    """OUT/val.jsonl: --val-pairs pairs of --val drawn with seed 0 (checked: a bad row is one line
    naming --val's file and line), the validation signal of tuning and of the curves."""
    pairs = data.load_sts_pairs(args.val)
    out = Path(args.out) / "val.jsonl"
    drawn = random.Random(0).sample(pairs, min(args.val_pairs, len(pairs)))
    out.write_text("".join(json.dumps(dict(sentence1=a, sentence2=b, score=s)) + "\n"
                           for a, b, s in drawn))
    return out


def measure(model_path, args, ppl_texts, max_new=None):
    """-> dict of the table's columns for one model (greedy rationales as long as it was trained
    with): STS on the first --pairs pairs of --sts, then evaluate.py's local SciFact and Banking77
    tasks."""
    from scipy.stats import spearmanr

    info = Path(model_path) / "grace.json"
    max_new = max_new or json.loads(info.read_text())["max_new_tokens"]
    sts = data.load_sts_pairs(args.sts, args.pairs)  # [(sentence1, sentence2, score)]
    model, tok = policy.load(model_path)
    enc = evaluate.GraceEncoder(model_path, model=model, tokenizer=tok, max_new_tokens=max_new,
                                batch_size=128, threads=args.threads)  # 128: 25% faster than 32
    e = torch.from_numpy(enc.encode_texts([a for a, _, _ in sts] + [b for _, b, _ in sts]))
    n, stats, pairs = len(e), dict(enc.stats), len(sts)  # e: (2P, H) unit vectors
    tasks = [mteb_tasks.local_task(args.scifact, args.sci_queries, args.sci_docs),
             mteb_tasks.local_task(args.banking, args.bank_rows)]
    scores = mteb_tasks.evaluate_model(enc, tasks, None, 128, say=lambda *a, **k: None)
    sci, bank = (100 * scores[t.metadata.name] for t in tasks)
    return dict(sts=100 * spearmanr((e[:pairs] * e[pairs:]).sum(-1), [x for _, _, x in sts]
                                    ).statistic, sci=sci, bank=bank,
                cos=((e.sum(0) @ e.sum(0) - n) / (n * (n - 1))).item(),
                ppl=diagnostics.perplexity(model, tok, ppl_texts),
                len=stats["tokens"] / stats["texts"], empty=stats["empty"] / stats["texts"])


def folder(label):
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


def train_run(model, out, extra, seed, args, eval_every=0):
    """train.py into `out` (replaced: the bench's own scratch), OUT/val.jsonl's Spearman every
    `eval_every` steps (0: never) -> (minutes, metrics rows)."""
    shutil.rmtree(out, ignore_errors=True)
    val = ["--eval-data", str(Path(args.out) / "val.jsonl"), "--eval-every", str(eval_every),
           "--eval-pairs", str(args.val_pairs)] if eval_every else []
    t = time.perf_counter()
    train.main(["--model", model, "--data", str(args.snli), "--seed", str(seed), "--out", str(out),
                "--threads", str(args.threads), "--log-rationales", "0", "--save-every", "1000000",
                "--keep-last", "1", *(["--steps", str(args.steps)] if args.steps else []), *val,
                *args.train_args.split(), *extra])  # (extra last: an equal-time run's --steps)
    minutes = (time.perf_counter() - t) / 60
    return minutes, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_and_measure(model, label, extra, seed, args, ppl_texts):
    """One row of the table: seed 0 also logs the --val curve."""
    out = Path(args.out) / folder(label) / f"seed-{seed}"
    minutes, m = train_run(model, out, extra, seed, args, args.eval_every * (seed == 0))
    k = max(1, len(m) // 4)  # the training reward, first and last quarter: did it move at all?
    trend = {f"reward_{w}": statistics.fmean(r.get("reward", float("nan")) for r in rs)
             for w, rs in (("first", m[:k]), ("last", m[-k:]))}
    return dict(run=label, seed=seed, minutes=minutes, steps=len(m), **trend,
                **measure(out / "final", args, ppl_texts))


def parallel(calls, jobs, done=lambda result: None):
    """[fn(*a) for fn, *a in calls], `jobs` processes at a time (1: here, in order); `done` sees
    each result as it comes, so a long bench keeps what finished."""
    results = [None] * len(calls)
    if jobs == 1:
        for i, (fn, *a) in enumerate(calls):
            results[i] = fn(*a)
            done(results[i])
        return results
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *a): i for i, (fn, *a) in enumerate(calls)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            done(results[futures[f]])
    return results


def tune(model, runs, args):
    """-> {run: its extra flags}: each lr of its grid (contrastive: x 1 or 4 steps per batch),
    one seed (TUNE_SEED), the best OUT/val.jsonl Spearman at the last step. Written to
    OUT/tuned.json."""
    grids = {label: [["--lr", lr, *k] for lr in LR_GRID.get(label, DEFAULT_GRID)
                     for k in ([["--ppo-epochs", "1"], ["--ppo-epochs", "4"]]
                               if "--objective" in extra else [[]])]
             for label, extra in runs.items()}
    calls = [(train_run, model, Path(args.out) / "tune" / folder(label) / folder(" ".join(g)),
              [*runs[label], *g], TUNE_SEED, args, args.steps or args.eval_every)
             for label, grid in grids.items() for g in grid]
    results, log, chosen = iter(parallel(calls, args.jobs)), [], {}  # in the calls' order
    for label, grid in grids.items():
        scores = []
        for g in grid:
            val = [r["sts_dev"] for r in next(results)[1] if "sts_dev" in r]
            scores.append(val[-1] if val else float("-inf"))
            log.append(dict(run=label, flags=g, val=scores[-1]))
            print(f"tune {label} {' '.join(g)}: --val Spearman x100 {scores[-1]:.1f}")
        chosen[label] = grid[max(range(len(grid)), key=scores.__getitem__)]
    (Path(args.out) / "tuned.json").write_text(json.dumps(dict(chosen=chosen, log=log), indent=1))
    return chosen


def paired_p(rows, run, key="sts"):
    """Two-sided paired t-test (same seeds) of `run` against GRACE release on `key`."""
    from scipy.stats import ttest_rel

    by = {r["run"]: {} for r in rows}
    for r in rows:
        by[r["run"]][r["seed"]] = r[key]
    ref, mine = by.get("GRACE release", {}), by.get(run, {})
    seeds = sorted(set(ref) & set(mine))
    if run in ("GRACE release", "base") or len(seeds) < 2:
        return "—"
    return f"{ttest_rel([mine[s] for s in seeds], [ref[s] for s in seeds]).pvalue:.3f}"


def base_row(args, ppl_texts, max_new):
    return dict(run="base", seed=0, minutes=0, **measure(args.model, args, ppl_texts, max_new))


def table(rows, args, model):
    def ms(rs, key, fmt, paired=False):  # mean ± sd [(p: the paired test against release)]
        xs = [r[key] for r in rs]
        sd = f" ± {fmt.format(statistics.stdev(xs))}" if len(xs) > 1 else ""
        p = paired_p(rows, rs[0]["run"], key) if paired else "—"
        return fmt.format(statistics.fmean(xs)) + sd + ("" if p == "—" else f" (p {p})")

    runs = list(dict.fromkeys(r["run"] for r in rows))
    head = (f"{model} on SNLI triplets, {args.steps or 'preset'} steps x the preset batch (equal "
            f"examples), {args.seeds} seed(s), mean ± sd (p: paired t-test vs GRACE release). "
            f"STS-B dev: first {args.pairs} pairs; SciFact: {args.sci_queries} train queries, "
            f"{args.sci_docs} other abstracts; Banking77: {args.bank_rows} rows a split; greedy "
            "rationales.\n\n"
            "| run | steps | STS-B dev ρ×100 | SciFact nDCG@10 | Banking77 acc "
            "| cos between texts | held-out ppl | rationale tokens | empty | reward first→last "
            "| min |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for run in runs:
        rs = [r for r in rows if r["run"] == run]
        if run == "base" or "contrastive" in run:
            reward = "—"
        else:
            first, last = (statistics.fmean(r[f"reward_{w}"] for r in rs)
                           for w in ("first", "last"))
            reward = f"{first:.3f}→{last:.3f}"
        empty = 100 * statistics.fmean(r['empty'] for r in rs)
        steps = "—" if run == "base" else rs[0].get("steps", "—")
        scores = " | ".join(ms(rs, k, "{:.1f}", paired=True) for k in ("sts", "sci", "bank"))
        lines.append(f"| {run} | {steps} | {scores} | {ms(rs, 'cos', '{:.3f}')} | "
                     f"{ms(rs, 'ppl', '{:.1f}')} | {ms(rs, 'len', '{:.1f}')} | {empty:.0f}% | "
                     f"{reward} | {'—' if run == 'base' else ms(rs, 'minutes', '{:.1f}')} |")
    return head + "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (kind, _, source) in DATA.items():
        p.add_argument(f"--{flag}", type=Path, metavar=kind, help=f"needed: {source}")
    p.add_argument("--model", default="tiny-lm")
    p.add_argument("--steps", type=int, default=20,
                   help="training steps of every run (0: the preset's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=1500, help="STS-B dev pairs measured (of 1500)")
    p.add_argument("--sci-queries", type=int, default=50, help="SciFact train queries searched")
    p.add_argument("--sci-docs", type=int, default=200,
                   help="SciFact abstracts searched besides the judged ones (a seeded sample)")
    p.add_argument("--bank-rows", type=int, default=400, help="Banking77 rows of each split")
    p.add_argument("--val", type=Path, metavar="FILE", help="the validation signal: STS "
                   "Benchmark *train* as JSONL (sentence1, sentence2, score); tunes (--tune) and "
                   "draws the curves")
    p.add_argument("--val-pairs", type=int, default=500, help="--val pairs drawn (seed 0)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between --val checks")
    p.add_argument("--tune", action="store_true",
                   help="choose each run's lr on --val first (else OUT/tuned.json's, if any)")
    p.add_argument("--ppl-lines", type=int, default=200)
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated subset of the trained runs")
    p.add_argument("--ablation", action="store_true",
                   help="also: release reward + advantages / group std")
    p.add_argument("--no-base", action="store_true", help="skip the base-model row")
    p.add_argument("--train-args", default="",
                   help="extra train.py flags for every run, e.g. "
                        "--train-args='--lr 1e-4 --no-length-penalty'")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each job")
    p.add_argument("--out", default="bench_out/learning")
    args = p.parse_args()
    check_data(args)
    if args.tune and not args.val:
        p.error("--tune needs --val FILE (STS Benchmark train)")
    torch.set_num_threads(args.threads)
    start, ppl_texts = time.perf_counter(), heldout_lines(args.wordnet, args.ppl_lines)
    # a run is picked by any part of its name
    wanted = [w.strip() for w in args.runs.split(",") if w.strip()]
    runs = {k: v for k, v in RUNS.items() if any(w in k for w in wanted)}
    runs |= ABLATION if args.ablation else {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.val:
        try:
            val_sample(args)
        except data.DataError as e:
            sys.exit(f"bench/learning.py: --val {e}")
    else:
        args.eval_every = 0  # no curves without a validation signal
    tuned_file = Path(args.out) / "tuned.json"
    tuned = tune(args.model, runs, args) if args.tune else \
        json.loads(tuned_file.read_text())["chosen"] if tuned_file.exists() else {}
    rows = []

    def keep(row):  # each row on disk as it finishes
        rows.append(row)
        with open(Path(args.out) / "rows.jsonl", "a") as f:
            f.write(json.dumps({**row, "train_args": args.train_args}) + "\n")

    def calls(label, extra):
        return [(train_and_measure, args.model, label, extra, seed, args, ppl_texts)
                for seed in range(args.seeds)]

    parallel([c for label, extra in runs.items() for c in calls(label, [*extra, *tuned.get(
        label, [])])], args.jobs, keep)
    done, second = {r["run"] for r in rows}, []
    if {"GRACE release", "contrastive"} <= done:  # equal wall-clock: its steps are cheaper
        def per_step(run):
            return statistics.fmean(r["minutes"] / r["steps"] for r in rows if r["run"] == run)
        grace = next(r["steps"] for r in rows if r["run"] == "GRACE release")
        steps = round(grace * per_step("GRACE release") / per_step("contrastive"))
        second += calls(EQUAL_TIME, [*runs["contrastive"], *tuned.get("contrastive", []),
                                     "--steps", str(steps)])
    if not args.no_base:  # the base model with the trained runs' rationale budget (else preset's)
        saved = sorted(Path(args.out).glob("*/seed-*/final/grace.json"))
        max_new = json.loads(saved[0].read_text())["max_new_tokens"] if rows and saved else \
            cli.PRESETS[cli.default_preset(args.model)]["max_new_tokens"]
        second.append((base_row, args, ppl_texts, max_new))
    parallel(second, args.jobs, keep)
    order = ["base", *runs, EQUAL_TIME]
    rows.sort(key=lambda r: (order.index(r["run"]), r["seed"]))
    if args.val and rows:  # the curves: seed 0 of every run, one PNG
        from tools import plot
        plot.main([str(Path(args.out) / folder(r) / "seed-0") for r in dict.fromkeys(
            r["run"] for r in rows if r["run"] != "base")] + ["--png", str(
                Path(args.out) / "curves.png")])
    wall = (time.perf_counter() - start) / 60
    chosen = "".join(f"\n- {k}: {' '.join(v)}" for k, v in tuned.items())
    text = table(rows, args, args.model) + (
        f"\nChosen on --val ({tuned_file}; {args.val_pairs} pairs of {args.val}, seed 0):"
        f"{chosen}\n" if tuned else "") + f"\nWall time: {wall:.1f} min, --jobs {args.jobs} " \
        f"x --threads {args.threads}.\n"
    print("\n" + text)
    (Path(args.out) / "learning.md").write_text(text)


if __name__ == "__main__":
    main()
