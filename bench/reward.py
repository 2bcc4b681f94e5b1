"""Cost of the vectorised rewards on a release-sized batch against a plain Python loop.

    python bench/reward.py [--groups 64 --group-size 8 --dim 1536]

The loop is the obvious per-row implementation (what reward.py replaces); both give the same
numbers (checked here), the table shows the median time of each and the ratio.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reward  # noqa: E402


def loop_rewards(q, m, n, G, tau=0.1, w=0.2):
    """Supervised GRACE reward, one row at a time."""
    groups = len(m) // G
    out = torch.empty(len(m))
    for i in range(len(m)):
        g = i // G
        own = range(g * G, g * G + G)
        s_clu = sum(float(m[i] @ m[j]) for j in own if j != i) / (G - 1)
        s_x = -sum(max(float(q[i] @ m[k]) for k in range(h * G, h * G + G)) for h in range(groups) if h != g) / (groups - 1)
        out[i] = (float(q[i] @ m[i]) - float(q[i] @ n[i]) + w * s_clu + w * s_x) / tau
    return out


def median_seconds(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=1536)
    args = p.parse_args()
    G, N = args.group_size, args.groups * args.group_size
    torch.manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    q = unit(torch.randn(args.groups, args.dim)).repeat_interleave(G, 0)
    n = unit(torch.randn(args.groups, args.dim)).repeat_interleave(G, 0)
    m = unit(torch.randn(N, args.dim))
    fast = lambda: reward.grace_rewards(q, m, n, G)[0]  # noqa: E731
    slow = lambda: loop_rewards(q, m, n, G)  # noqa: E731
    assert torch.allclose(fast(), slow(), atol=1e-3)
    t_fast, t_slow = median_seconds(fast, 50), median_seconds(slow, 3)
    print(f"supervised GRACE reward, {args.groups} groups x G={G}, dim {args.dim}, CPU, {torch.get_num_threads()} threads")
    print("| implementation | median time | ratio |\n|---|---|---|")
    print(f"| reward.grace_rewards (vectorised) | {t_fast * 1e6:.0f} us | 1.0 |")
    print(f"| per-row Python loop | {t_slow * 1e6:.0f} us | {t_slow / t_fast:.0f}x slower |")


if __name__ == "__main__":
    main()
