"""Peak memory of policy.token_logprobs (chunked) against the naive full-logits version.

    python bench/policy.py [--batch 16 --seq 512 --vocab 32000]

Each variant runs in a fresh process (peak RSS can only grow within a process); the table shows the
peak resident memory above the process's state right before the call (model and inputs already
built), with and without gradients, and the ratio naive / chunked.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import policy

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, args.seq // 4:] = 1  # prompt = first quarter, the rest is the scored completion
    grad = args.grad == "on"

    def naive():
        # (B, T, V): the whole batch
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.nn.functional.pad(logp, (1, 0)) * completion

    def chunked():
        return policy.token_logprobs(model, ids, mask, completion)

    fn = {"naive": naive, "chunked": chunked}[args.variant]
    with torch.set_grad_enabled(grad):
        base = rss_peak_mib()  # no warm-up: its peak would hide the one we measure
        t = time.perf_counter()
        out = fn()
        if grad:
            out.sum().backward()
        seconds = time.perf_counter() - t
    print(json.dumps({"peak_mib": rss_peak_mib() - base, "seconds": seconds}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variant", default=None)
    p.add_argument("--grad", default="off")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as train.py)")
    args = p.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(args.threads)
        return child(args)
    full = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"token_logprobs peak memory, batch {args.batch} x {args.seq} tokens x vocab "
          f"{args.vocab} (one float32 logits tensor of the batch = {full:.0f} MiB), CPU")
    print(f"{'grad':>5} | {'naive MiB':>10} | {'chunked MiB':>11} | {'naive/chunked':>13} | "
          f"{'naive s':>7} | {'chunked s':>9}")
    for grad in ("off", "on"):
        res = {}
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--variant", variant, "--grad", grad,
                   "--threads", str(args.threads),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[variant] = json.loads(out.strip().splitlines()[-1])
        n, c = res["naive"], res["chunked"]
        print(f"{grad:>5} | {n['peak_mib']:>10.0f} | {c['peak_mib']:>11.0f} | "
              f"{n['peak_mib'] / max(c['peak_mib'], 1):>13.1f} | {n['seconds']:>7.2f} | "
              f"{c['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
