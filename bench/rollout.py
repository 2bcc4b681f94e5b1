"""Tokens/s of rollout.sample against model.generate on the same random Qwen2 model.

    python bench/rollout.py            (from the repo root; a few minutes on 2 CPU cores)

Greedy, EOS disabled so both write exactly `new` tokens per row. Runs alternate (ours, HF, ours,
HF, ...) so drift in machine load hits both alike; the median of the pairs is reported. The HF
reference is plain `generate` (its default DynamicCache) for every row of the table. On a CUDA
machine, GPU rows follow (bf16, larger batch and longer rollouts, static cache + CUDA graphs).

The compiled CPU path may route nn.Linear through oneDNN (`rollout.onednn_linears`, where
`rollout.onednn_pays` times it faster); the row "static + oneDNN" isolates that change without
torch.compile, and a second table times the two matmul libraries alone on the shapes of one decode
step, on this machine.

The last table sets each decode step against its floor: the time to read the bf16 weights once at
the bandwidth this machine reaches (a large copy, timed in the same run). Models with grouped KV
heads (8 query heads on 2), bf16 weights and fp32 master weights under bf16 autocast (how train.py
samples on GPU); each plain, compiled "before" (the model itself: weights re-cast and KV cache
expanded inside every step) and compiled now (from `rollout.decode_copy`). On CPU a small model at
batch 16; on a GPU the Qwen2.5-1.5B shape at batch 128 (--floor-only runs just that table).
"""
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout  # noqa: E402
from train_step import SHAPES  # noqa: E402  (bench/ is the script's folder, so on the path)


# The targets set for rollout.py (tokens/s ratio to HF generate); the v4k rows are extra, no target.
TARGETS = {"cpu plain": 1.0, "cpu compiled": 1.5, "cuda plain": 1.0, "cuda compiled": 3.0}


def make_model(device, dtype, vocab=32000, shape=None, kv_heads=4):
    """A random Qwen2: hidden 256, 4 layers (the CPU rows), or a named real shape from bench/train_step.py."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dims = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8 if kv_heads < 4 else 4,
                num_key_value_heads=kv_heads, vocab_size=vocab)
    if shape:
        dims = {k: v for k, v in SHAPES[shape].items() if k != "model_type"}
    cfg = Qwen2Config(**dims, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: a 1.5B model is slow to build on the host
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
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


# ----------------------------------------------------------------------------- against the bandwidth floor

def bandwidth(device, mib=512, repeats=5):
    """Bytes/s this device moves in a large copy (read + write), median of `repeats`."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / statistics.median(timed(lambda: dst.copy_(src), device)[1] for _ in range(repeats))


def streamed_bytes(model, bytes_per_param=2):
    """Weight bytes one decode step must read: every parameter but an input embedding table (a few
    rows are looked up) that is not also the output head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return bytes_per_param * sum(p.numel() for p in model.parameters() if p is not emb or p is head)


def floor_table(device, batch, prompt, new, pairs, shape=None):
    """Milliseconds per decode step against reading the bf16 weights once: bf16 weights, and fp32
    weights under bf16 autocast; each plain, compiled as before (the model itself: weights re-cast and
    KV cache expanded inside the graph, see rollout.sampling_model) and compiled now (decode copy)."""
    build = lambda dtype: make_model(device, dtype, shape=shape, kv_heads=2)  # noqa: E731  grouped KV heads, as real models
    bw = bandwidth(device)
    meta = make_model(torch.device("meta"), torch.bfloat16, shape=shape, kv_heads=2)  # shapes only, no memory
    weights, c = streamed_bytes(meta), meta.config
    kv = batch * (prompt + new) * c.num_hidden_layers * 2 * c.num_key_value_heads * meta.model.layers[0].self_attn.head_dim * 2
    floor_s = weights / bw
    steps = {}  # the old compiled path: the model itself compiled, once per model

    def as_before(model, compile):
        if compile and model not in steps:
            steps[model] = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default",
                                         fullgraph=True, dynamic=False)
        return model, steps[model] if compile else model

    before = mock.patch.object(rollout, "sampling_model", as_before)
    rows = []
    for dtype, autocast in [(torch.bfloat16, False), (torch.float32, True)]:
        model = build(dtype)
        ids, mask = make_prompts(batch, prompt, model.config.vocab_size, device)
        label = "bf16 weights" if dtype == torch.bfloat16 else "fp32 + autocast"
        for name, compile, patch in [("plain", False, None), ("compiled, before", True, before),
                                     ("compiled (decode copy)", True, None)]:
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), patch or mock.MagicMock():
                    return rollout.sample(model, ids, mask, new, temperature=0, compile=compile, check_every=new)
            out, _ = timed(run, device)  # warm-up: compiles
            if not compile:
                ref = out.sequences
            step = statistics.median(timed(run, device)[1] for _ in range(pairs)) / new
            rows.append((f"{label}, {name}", step * 1e3, batch / step, floor_s / step,
                         (out.sequences == ref).float().mean().item()))
            print(f"  done {device.type} {rows[-1][0]}", file=sys.stderr, flush=True)
            torch._dynamo.reset()
        rollout._copies.clear()
        steps.clear()
    print(f"\n{device.type}: {shape or 'hidden 256 x 4 layers, 8 heads on 2 KV heads, vocab 32000'}, batch {batch},"
          f" prompt {prompt}, {new} new tokens, greedy, median of {pairs}; floor = {weights / 1e9:.3f} GB of bf16"
          f" weights per step at {bw / 1e9:.0f} GB/s (a copy, timed) = {floor_s * 1e3:.3f} ms (a compiled step also"
          f" reads the whole static KV cache, {kv / 1e9:.3f} GB); same tokens: against the plain row of the same"
          f" weights (a bf16 near-tie flips a greedy token, and the rest of that row follows)")
    print(f"| {'rollouts':<40} | {'ms/step':>8} | {'tok/s':>8} | {'of floor':>8} | {'same tokens':>11} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, ms, tps, frac, same in rows:
        print(f"| {name:<40} | {ms:>8.2f} | {tps:>8.0f} | {frac:>7.0%} | {same:>10.1%} |")


def main():
    if "--floor-only" in sys.argv:
        cuda = torch.cuda.is_available()
        return floor_table(torch.device("cuda" if cuda else "cpu"), batch=128 if cuda else 16, prompt=64,
                           new=128, pairs=3, shape="Qwen2.5-1.5B" if cuda else None)
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
    floor_table(cpu, batch=16, prompt=64, new=128, pairs=3)
    if torch.cuda.is_available():
        floor_table(torch.device("cuda"), batch=128, prompt=64, new=128, pairs=3, shape="Qwen2.5-1.5B")


if __name__ == "__main__":
    main()
