"""Texts per second of evaluate.encode_texts (rationale + pooling): length-sorted vs unsorted
batches.

Sorting puts texts of similar length in a batch, so less of each batch is left padding. Same texts,
same model, same settings; only the batch order differs. Median of --runs alternating timed runs.
The texts are both sides of the STS Benchmark dev pairs (--sts: its dev.jsonl, one JSON object a
line with sentence1 and sentence2).

    python bench/evaluate.py --sts DATA/stsbenchmark/dev.jsonl     # tiny on CPU, 512 sentences
    python bench/evaluate.py --sts DATA/stsbenchmark/dev.jsonl --device cuda --large
                                                 # a ~100M random Qwen2 on a GPU
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import policy  # noqa: E402
from infra import tiny  # noqa: E402


STS_SOURCE = ("the STS Benchmark dev split as JSONL (sentence1, sentence2, score), published at "
              "https://ixa2.si.ehu.eus/stswiki/index.php/STSbenchmark")


def texts_from(path, n):
    """n sentences, both sides of the STS pairs (their lengths vary from 3 to ~50 words)."""
    if path is None or not path.is_file():
        got = "" if path is None else f" ({path} is not a file)"
        print(f"bench/evaluate.py needs --sts{got}: {STS_SOURCE}", file=sys.stderr)
        sys.exit(2)
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["sentence1"], row["sentence2"]]
    return texts[:n]


def load_model(large, device):
    if not large:
        model, tokenizer = policy.load("tiny", device=device)
    else:  # a random Qwen2 of ~100M parameters with the tiny tokenizer: the cost of a real forward
        from transformers import AutoModelForCausalLM, Qwen2Config
        tokenizer = tiny.build_tokenizer()
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.to(device=device,
                 dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return model.eval(), tokenizer


def padding_share(tokenizer, texts, batch_size, sort):
    """Share of prompt positions (system prompt + text) that are padding, for this batching."""
    lengths = policy.build_prompts(tokenizer, texts)[1].sum(1).tolist()
    if sort:
        lengths.sort(reverse=True)
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    width = sum(max(b) * len(b) for b in batches)
    return 1 - sum(lengths) / width


def timed(fns, runs):
    """Median seconds of each function. Runs alternate (a, b, a, b, ...) so that a slower spell of
    the machine hits both alike; one warm-up each first (allocation, kernel selection)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sts", type=Path, metavar="FILE",
                   help=f"needed: {STS_SOURCE} (its dev.jsonl)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--large", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch, as evaluate.py's --threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = texts_from(args.sts, args.n)
    model, tokenizer = load_model(args.large, args.device)
    name = "random Qwen2 ~100M" if args.large else "tiny"
    print(f"{name} on {args.device}, {len(texts)} texts, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens (greedy), median of {args.runs} alternating runs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def run(sort):
        return lambda: evaluate.encode_texts(model, tokenizer, texts, batch_size=args.batch_size,
                                             max_new_tokens=args.max_new_tokens, sort=sort)

    seconds = timed([run(False), run(True)], args.runs)
    rows = {sort: (len(texts) / s, padding_share(tokenizer, texts, args.batch_size, sort))
            for sort, s in zip((False, True), seconds)}
    print(f"{'batching':<10}{'texts/s':>10}{'prompt padding':>16}{'speed-up':>10}")
    for sort, label in ((False, "unsorted"), (True, "sorted")):
        speed, pad = rows[sort]
        print(f"{label:<10}{speed:>10.1f}{100 * pad:>15.1f}%{speed / rows[False][0]:>9.2f}x")


if __name__ == "__main__":
    main()
