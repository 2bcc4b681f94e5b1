"""Cost of the vectorised rewards on a release-sized batch against a plain Python loop.

    python bench/reward.py [--groups 64 --group-size 8 --dim 1536 --threads 1]

The loops are the obvious per-row implementations (what reward.py replaces); each pair gives the
same numbers (checked here), the table shows the median time of each and the ratio. CPU timings
swing with other load on the machine: with 2 cores busy, leave --threads at 1 (oversubscribed
threads are slower).
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
        s_x = -sum(max(float(q[i] @ m[k]) for k in range(h * G, h * G + G))
                   for h in range(groups) if h != g) / (groups - 1)
        out[i] = (float(q[i] @ m[i]) - float(q[i] @ n[i]) + w * s_clu + w * s_x) / tau
    return out


def loop_unsupervised(q, m, G, tau=0.1, w=0.2):
    """Unsupervised GRACE reward, one row at a time."""
    groups = len(m) // G
    out = torch.empty(len(m))
    for i in range(len(m)):
        g = i // G
        s_clu = sum(float(m[i] @ m[j]) for j in range(g * G, g * G + G) if j != i) / (G - 1)
        s_x = sum(float(m[i] @ q[h * G]) for h in range(groups) if h != g) / (groups - 1)
        out[i] = (float(q[i] @ m[i]) + w * s_clu - w * s_x) / tau
    return out


def loop_infonce(q, m, n, G, tau=0.1):
    """Per-rollout InfoNCE, one row at a time (candidates: every group's query, then negative)."""
    cands = torch.cat([q[::G], n[::G]])
    out = torch.empty(len(m))
    for i in range(len(m)):
        logits = torch.stack([m[i] @ c for c in cands]) / tau
        out[i] = logits[i // G] - logits.logsumexp(0)
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
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    G, N = args.group_size, args.groups * args.group_size
    torch.manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    q = unit(torch.randn(args.groups, args.dim)).repeat_interleave(G, 0)
    n = unit(torch.randn(args.groups, args.dim)).repeat_interleave(G, 0)
    m = unit(torch.randn(N, args.dim))
    cases = [  # name, vectorised, loop
        ("grace_rewards (supervised)", lambda: reward.grace_rewards(q, m, n, G)[0],
         lambda: loop_rewards(q, m, n, G)),
        ("unsupervised_rewards", lambda: reward.unsupervised_rewards(q, m, G)[0],
         lambda: loop_unsupervised(q, m, G)),
        ("infonce_rewards", lambda: reward.infonce_rewards(q, m, n, G)[0],
         lambda: loop_infonce(q, m, n, G)),
    ]
    print(f"{args.groups} groups x G={G}, dim {args.dim}, CPU, {torch.get_num_threads()} "
          "thread(s), float32")
    print("| reward | vectorised | per-row loop | loop / vectorised |\n|---|---|---|---|")
    for name, fast, slow in cases:
        assert torch.allclose(fast(), slow(), atol=1e-3), name
        t_fast, t_slow = median_seconds(fast, 30), median_seconds(slow, 3)
        print(f"| {name} | {t_fast * 1e3:.2f} ms | {t_slow * 1e3:.0f} ms | "
              f"{t_slow / t_fast:.0f}x |")


if __name__ == "__main__":
    main()
