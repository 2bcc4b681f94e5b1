"""Tokens/s of rollout.sample against model.generate on the same random Qwen2 model.

    python bench/rollout.py            (from the repo root; a few minutes on 2 CPU cores)

Greedy, EOS disabled so both write exactly `new` tokens per row. Runs alternate (ours, HF, ours,
HF, ...) so drift in machine load hits both alike; the median of the pairs is reported. The HF
reference is plain `generate` (its default DynamicCache) for every row of the table. On a CUDA
machine, GPU rows follow (bf16, larger batch and longer rollouts, static cache + CUDA graphs).

The compiled CPU path routes nn.Linear through oneDNN (`rollout.onednn_linears`); the row "static +
oneDNN" isolates that change without torch.compile, and a second table times the two matmul
libraries alone on the shapes of one decode step, on this machine.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout  # noqa: E402


# The targets set for rollout.py (tokens/s ratio to HF generate); the v4k rows are extra, no target.
TARGETS = {"cpu plain": 1.0, "cpu compiled": 1.5, "cuda plain": 1.0, "cuda compiled": 3.0}


def make_model(device, dtype, vocab=32000):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # EOS disabled: exactly `new` tokens per row
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(batch, length, vocab, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # ragged: 0 .. length/4 left-pad tokens
        pad = int(torch.randint(0, length // 4 + 1, (1,), generator=g))
        ids[i, :pad], mask[i, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def bench(device, dtype, batch, prompt, new, modes, pairs, vocab=32000, tag=""):
    model = make_model(device, dtype, vocab)
    ids, mask = make_prompts(batch, prompt, model.config.vocab_size, device)
    hf = lambda: model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,  # noqa: E731
                                pad_token_id=0, eos_token_id=None)
    ref, _ = timed(hf, device)  # warm-up, and the tokens ours must match
    rows = []
    for name, kw in modes:
        kw = dict(kw)
        onednn = kw.pop("onednn", False)

        def ours(kw=kw, onednn=onednn):
            with rollout.onednn_linears(model, enabled=onednn):
                return rollout.sample(model, ids, mask, new, temperature=0, **kw)

        t0 = time.perf_counter()
        out, _ = timed(ours, device)  # warm-up (compiles the decode step once)
        warm = time.perf_counter() - t0
        assert out.sequences.shape == ref.shape, (out.sequences.shape, ref.shape)
        same = (out.sequences == ref).float().mean().item()
        ratios, ours_tps, hf_tps = [], [], []
        for _ in range(pairs):
            _, t_ours = timed(ours, device)
            _, t_hf = timed(hf, device)
            ours_tps.append(batch * new / t_ours)
            hf_tps.append(batch * new / t_hf)
            ratios.append(t_hf / t_ours)
        rows.append((f"{device.type}{tag} {name}", statistics.median(ours_tps), statistics.median(hf_tps),
                     statistics.median(ratios), same, warm))
        print(f"  done {device.type} {name} (first call {warm:.1f}s)", file=sys.stderr, flush=True)
    return rows


def matmul_table(batch=16, hidden=256, repeats=50):
    """F.linear (the default BLAS) vs rollout.onednn_linear on the (batch x hidden) @ weight.T
    products of one decode step; median microseconds of `repeats` calls each."""
    def median_us(fn):
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    print(f"\nlinear of a ({batch}, in) batch, fp32 CPU, median of {repeats} calls:")
    print(f"| {'weight (out, in)':<18} | {'F.linear us':>11} | {'oneDNN us':>9} | {'ratio':>6} | {'max abs diff':>12} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 11}|{'-' * 8}|{'-' * 14}|")
    for out_f, in_f in [(hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden), (32000, hidden)]:
        x, w = torch.randn(batch, in_f), torch.randn(out_f, in_f) / in_f ** 0.5
        blas, onednn = median_us(lambda: F.linear(x, w)), median_us(lambda: rollout.onednn_linear(x, w, None))
        diff = (F.linear(x, w) - rollout.onednn_linear(x, w, None)).abs().max().item()
        print(f"| {f'({out_f}, {in_f})':<18} | {blas:>11.0f} | {onednn:>9.0f} | {blas / onednn:>5.2f}x | {diff:>12.1e} |")


def main():
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    modes = [("plain", {}), ("static", dict(static_cache=True)),
             ("static + oneDNN", dict(static_cache=True, onednn=True)), ("compiled", dict(compile=True))]
    rows = bench(cpu, torch.float32, batch=16, prompt=32, new=64, modes=modes, pairs=7)
    # The same model with a 4k vocabulary: the fp32 lm_head matmul (the same work for both sides,
    # over half of a decode step at 32k) shrinks, so the loop's own overhead shows.
    rows += bench(cpu, torch.float32, batch=16, prompt=32, new=64, modes=modes, pairs=7, vocab=4096, tag=" v4k")
    setting = ["cpu: fp32, batch 16, prompt 32 (ragged), 64 new tokens, greedy, median of 7 pairs;"
               " vocab 32000 (v4k: 4096)"]
    if torch.cuda.is_available():
        gpu_modes = [(name, kw) for name, kw in modes if "onednn" not in kw]  # oneDNN is CPU-only
        rows += bench(torch.device("cuda"), torch.bfloat16, batch=64, prompt=32, new=256, modes=gpu_modes, pairs=5)
        setting.append("cuda: bf16, batch 64, prompt 32 (ragged), 256 new tokens, greedy, median of 5 pairs")
    print("\n".join(setting))
    print(f"| {'mode':<24} | {'ours tok/s':>10} | {'HF tok/s':>10} | {'ratio':>6} | {'same tokens':>11} | "
          f"{'target':<13} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 13}|{'-' * 15}|")
    for name, ours, hf, ratio, same, _ in rows:
        target = TARGETS.get(name)
        verdict = "" if target is None else f">= {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
        print(f"| {name:<24} | {ours:>10.0f} | {hf:>10.0f} | {ratio:>5.2f}x | {same:>10.1%} | {verdict:<13} |")
    matmul_table()


if __name__ == "__main__":
    main()
