"""A picture of a training run: OUT/metrics.jsonl -> one PNG of the curves that tell whether
GRACE learns.

    pip install matplotlib                 # the one optional extra
    python tools/plot.py out/              # -> out/run.png
    python tools/plot.py out/ other_run/ --png compare.png

Panels: the reward and each of its terms (or the contrastive loss), collapse (the mean cosine
between embeddings of different texts: 1 means every text looks alike), rationale length and the
share of empty rationales (a policy that learns to write nothing is the first hack to rule out),
the KL to the reference, and the STS Spearman when the run logged one (--eval-every). Several runs
share the axes.
"""
import argparse
import json
import sys
from pathlib import Path

PANELS = [  # (title, metric keys drawn in it)
    ("reward (and its terms)", ("reward", "reward/positive", "reward/clustering",
                                "reward/negative", "reward/cross_group", "reward/logsumexp")),
    ("loss", ("loss",)),
    ("collapse: cos between texts", ("cos_between_texts", "cos_within_group")),
    ("rationale length (tokens)", ("rationale_len",)),
    ("empty / truncated share", ("empty_frac", "truncated_frac")),
    ("KL to the reference", ("kl",)),
    ("STS Spearman", ("sts_dev_spearman",)),
]


def read_metrics(path):
    """Rows of a metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def plot(runs, png):
    """runs: {label: rows}. Draws the panels that have data, one line per run and key."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS
              if any(r.get(k) is not None for rows in runs.values() for r in rows for k in keys)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for label, rows in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), label=f"{label}: {key}" if len(runs) > 1 else key,
                            linewidth=1)
        ax.set_title(title, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot OUT/metrics.jsonl of one or more training runs "
                                            "into a PNG.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+",
                   help="run folders (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--png", help="output image (default: FIRST_RUN/run.png)")
    args = p.parse_args(argv)
    runs = {}
    for run in args.runs:
        path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
        if not path.exists():
            p.error(f"{path}: no such file (give a run folder from train.py --out, "
                    "or its metrics.jsonl)")
        rows = read_metrics(path)
        if not rows:
            p.error(f"{path}: no metrics rows")
        runs[str(run)] = rows
    png = args.png or str((Path(args.runs[0]) if Path(args.runs[0]).is_dir()
                           else Path(args.runs[0]).parent) / "run.png")
    try:
        plot(runs, png)
    except ImportError:
        print("error: plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
