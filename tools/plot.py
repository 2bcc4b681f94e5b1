"""A picture of training runs: RUN/metrics.jsonl -> one PNG of the curves that tell whether GRACE
learns.

    pip install matplotlib                 # the one optional extra
    python tools/plot.py out/              # -> out/metrics.png, beside the metrics
    python tools/plot.py out/ other_run/ --png compare.png

Panels: the total reward (what the policy gradient maximises), its terms (each about +-1/tau, so
on their own axis) or the contrastive loss, collapse (the mean cosine between embeddings of
different texts: 1 means every text looks alike), rationale length and the share of empty
rationales (a policy that learns to write nothing is the first hack to rule out), the KL to the
reference, and the STS Spearman x 100 when the run logged one (--eval-every). Each run has one
colour in every panel; the title names the runs and their key settings (from RUN/config.json).
"""
import argparse
import json
import sys
from pathlib import Path

# (title, metric keys drawn in it): a run's keys in one panel differ by line style
PANELS = [
    ("total reward (optimised)", ("reward",)),
    ("reward terms", ("reward/positive", "reward/negative", "reward/clustering",
                      "reward/cross_group", "reward/in_batch", "reward/logsumexp")),
    ("loss", ("loss",)),
    ("collapse: cos between texts", ("cos_between_texts", "cos_within_group")),
    ("rationale length (tokens)", ("rationale_len",)),
    ("empty / truncated share", ("empty_frac", "truncated_frac")),
    ("KL to the reference", ("kl",)),
    ("STS Spearman x 100 (--eval-data)", ("sts_dev",)),
]
STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
# the settings shown in the title, as named there
SHOWN = {"model": "model", "objective": "objective", "reward": "reward", "lr": "lr",
         "group_size": "G", "batch_size": "batch", "kl_coef": "kl", "seed": "seed"}


def read_metrics(path):
    """Rows of a metrics.jsonl (a line cut short by a kill is skipped). STS logged on the old
    0-1 scale (sts_dev_spearman) is brought to today's x 100 (sts_dev)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            if row.get("sts_dev") is None and row.get("sts_dev_spearman") is not None:
                row["sts_dev"] = 100 * row["sts_dev_spearman"]
            rows.append(row)
    return rows


def read_settings(folder):
    """The run's key settings as one short string, from config.json (train.py's resolved flags)
    or else final/grace.json; '' when the folder has neither."""
    for path in (folder / "config.json", folder / "final" / "grace.json"):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config.setdefault("model", config.get("base_model"))
        return ", ".join(f"{name} {config[k]}".strip() for k, name in SHOWN.items()
                         if config.get(k) is not None)
    return ""


def plot(runs, png, settings=None):
    """runs: {label: rows}; settings: {label: str} for the title. Draws the panels that have data
    (one colour per run) and saves png -> the figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = settings or {}
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    panels = [(title, [k for k in keys if any(r.get(k) is not None
                                              for rows in runs.values() for r in rows)])
              for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.9 * len(panels) + 0.6 * len(runs)),
                             sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        if ax is axes[0, 0] and len(runs) > 1:  # which colour is which run, once
            ax.add_artist(ax.legend([Line2D([], [], color=colours[label]) for label in runs],
                                    list(runs), fontsize=7, loc="best"))
        for label, rows in runs.items():
            for key, style in zip(keys, STYLES):
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), color=colours[label], linestyle=style, linewidth=1.2,
                            marker="." if len(points) < 30 else None, label=f"{label}: {key}")
        if len(keys) > 1:  # which style is which key (the colour is the run)
            ax.legend([Line2D([], [], color="0.3", linestyle=s) for s in STYLES[:len(keys)]],
                      [k.removeprefix("reward/") for k in keys], fontsize=7, loc="best", ncol=2)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("\n".join(f"{label}: {settings[label]}" if settings.get(label) else label
                           for label in runs), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return fig


def run_label(path, paths):
    """A run's name: its folder's, or its path where two runs share a folder name."""
    names = [p.parent.name for p in paths]
    return path.parent.name if names.count(path.parent.name) == 1 else str(path.parent)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot RUN/metrics.jsonl of one or more training runs "
                                            "into a PNG.")
    p.add_argument("runs", nargs="+",
                   help="run folders (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--png", help="output image (default: metrics.png beside the first run's "
                                 "metrics.jsonl)")
    args = p.parse_args(argv)
    paths = [Path(r) / "metrics.jsonl" if Path(r).is_dir() else Path(r) for r in args.runs]
    runs, settings = {}, {}
    for path in paths:
        if not path.exists():
            p.error(f"{path}: no such file (give a run folder from train.py --out, "
                    "or its metrics.jsonl)")
        rows = read_metrics(path)
        if not rows:
            p.error(f"{path}: no metrics rows")
        label = run_label(path, paths)
        runs[label], settings[label] = rows, read_settings(path.parent)
    png = args.png or str(paths[0].parent / "metrics.png")
    try:
        plot(runs, png, settings)
    except ImportError:
        print("error: plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
