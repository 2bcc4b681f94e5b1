"""What does the reward really optimise? Three short runs of tiny on SNLI, same seed and step budget.

    python bench/ablation.py [--steps 150] [--out bench_out/ablation]

- release:          GRACE's supervised reward (s_neg and s_x are constant within a group, so they
                    cancel in the advantage; only s_pos and s_clu steer the policy)
- infonce:          the per-rollout contrastive reward (every candidate similarity involves main_i)
- release + std:    the release reward with advantages divided by the group std (GRPO's habit)

The table (see bench/learning.py for the columns) is what README's "What the reward really
optimises" quotes.
"""
import argparse
from pathlib import Path

from learning import SNLI, STS_DEV, print_table, sts_spearman, train_and_measure

RUNS = [("release", []), ("infonce", ["--reward", "infonce"]), ("release + std", ["--scale-adv-by-std"])]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="bench_out/ablation")
    p.add_argument("--lr", default="3e-4", help="tiny's default")
    args = p.parse_args()
    if not SNLI.exists() or not STS_DEV.exists():
        raise SystemExit(f"needs {SNLI} and {STS_DEV} (the shared data beside the repo)")
    before = sts_spearman("tiny")
    rows = [train_and_measure(label, [*extra, "--lr", args.lr], args.steps,
                              Path(args.out) / label.replace(" ", "").replace("+", "_")) for label, extra in RUNS]
    print_table(rows, before, args.steps)


if __name__ == "__main__":
    main()
