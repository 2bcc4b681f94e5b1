"""Tokens/s of rollout.sample against model.generate on the same random Qwen2 model.

    python bench/rollout.py               (from the repo root; a few minutes on 2 CPU cores)
    python bench/rollout.py --floor-only  (just the last table; on a GPU the Qwen2.5-1.5B shape)

Greedy, EOS disabled so both write exactly `new` tokens per row. Runs alternate (ours, HF, ours,
HF, ...) so drift in machine load hits both alike; the median of the pairs is reported. The HF
reference is plain `generate` (its default DynamicCache) for every row of the table. The modes:
plain (rollout.plain_step), static (fast_decode.static_step(model, compile=False): the static
cache, eager) and compiled (fast_decode.static_step(model)). On a CUDA machine, GPU rows follow
(bf16, larger batch and longer rollouts, static cache + CUDA graphs).

A oneDNN route for the CPU linear layers measured 0.33x-1.00x F.linear on decode shapes on an Intel
Xeon, so it was removed.

The last table sets each decode step against its floor: the time to read the bf16 weights once at
the bandwidth this machine reaches (a large copy, timed in the same run). Models with grouped KV
heads (8 query heads on 2), bf16 weights and fp32 master weights under bf16 autocast (how train.py
samples on GPU); each plain, compiled "before" (the model itself: weights re-cast and KV cache
expanded inside every step) and compiled now (from `fast_decode.decode_copy`). On CPU a small
model at batch 16; on a GPU the Qwen2.5-1.5B shape at batch 128 (--floor-only runs just that
table).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout  # noqa: E402
from infra import fast_decode  # noqa: E402
from train_step import SHAPES  # noqa: E402  (bench/ is the script's folder, so on the path)


# The targets set for rollout.py (tokens/s ratio to HF generate); the v4k rows are extra, no
# target.
TARGETS = {"cpu plain": 1.0, "cpu compiled": 1.5, "cuda plain": 1.0, "cuda compiled": 3.0}

# mode -> the decode step rollout.sample gets, made at every call: a compiled step refreshes
# its decode copy from the master when it is made, as train.py does before each batch of rollouts
MODES = {"plain": lambda model: rollout.plain_step(model),
         "static": lambda model: fast_decode.static_step(model, compile=False),
         "compiled": lambda model: fast_decode.static_step(model)}


def make_model(device, dtype, vocab=32000, shape=None, kv_heads=4):
    """A random Qwen2: hidden 256, 4 layers (the CPU rows), or a named real shape from
    bench/train_step.py."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dims = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8 if kv_heads < 4 else 4, num_key_value_heads=kv_heads,
                vocab_size=vocab)
    if shape:
        dims = {k: v for k, v in SHAPES[shape].items() if k != "model_type"}
    cfg = Qwen2Config(**dims, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
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

    def hf():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              pad_token_id=0, eos_token_id=None)
    ref, _ = timed(hf, device)  # warm-up, and the tokens ours must match
    rows = []
    for name in modes:
        def ours(make_step=MODES[name]):
            return rollout.sample(model, ids, mask, new, temperature=0, step=make_step(model))

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
        rows.append((f"{device.type}{tag} {name}", statistics.median(ours_tps),
                     statistics.median(hf_tps), statistics.median(ratios), same, warm))
        print(f"  done {device.type} {name} (first call {warm:.1f}s)", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------ against the bandwidth floor

def bandwidth(device, mib=512, repeats=5):
    """Bytes/s this device moves in a large copy (read + write), median of `repeats`."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device)[1] for _ in range(repeats))
    return 2 * src.numel() * 4 / seconds


def streamed_bytes(model, bytes_per_param=2):
    """Weight bytes one decode step must read: every parameter but an input embedding table (a few
    rows are looked up) that is not also the output head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return bytes_per_param * sum(p.numel() for p in model.parameters()
                                 if p is not emb or p is head)


def floor_table(device, batch, prompt, new, pairs, shape=None):
    """Milliseconds per decode step against reading the bf16 weights once: bf16 weights, and fp32
    weights under bf16 autocast; each plain, compiled as before (the model itself: weights re-cast
    and KV cache expanded inside the graph, see fast_decode.sampling_model) and compiled now
    (decode copy)."""
    def build(dtype):  # grouped KV heads, as real models
        return make_model(device, dtype, shape=shape, kv_heads=2)
    bw = bandwidth(device)
    meta = make_model(torch.device("meta"), torch.bfloat16, shape=shape, kv_heads=2)  # shapes
    weights, c = streamed_bytes(meta), meta.config
    head_dim = meta.model.layers[0].self_attn.head_dim
    kv = batch * (prompt + new) * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2
    floor_s = weights / bw
    steps = {}  # the old compiled path: the model itself compiled, once per model

    def as_before(model, compile):
        if compile and model not in steps:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            steps[model] = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
        return model, steps[model] if compile else model

    before = mock.patch.object(fast_decode, "sampling_model", as_before)
    rows = []
    for dtype, autocast in [(torch.bfloat16, False), (torch.float32, True)]:
        model = build(dtype)
        ids, mask = make_prompts(batch, prompt, model.config.vocab_size, device)
        label = "bf16 weights" if dtype == torch.bfloat16 else "fp32 + autocast"
        for name, compile, patch in [("plain", False, None), ("compiled, before", True, before),
                                     ("compiled (decode copy)", True, None)]:
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), \
                        patch or mock.MagicMock():
                    step = fast_decode.static_step(model) if compile else None  # None: plain
                    return rollout.sample(model, ids, mask, new, temperature=0, step=step,
                                          check_every=new)
            out, _ = timed(run, device)  # warm-up: compiles
            if not compile:
                ref = out.sequences
            step = statistics.median(timed(run, device)[1] for _ in range(pairs)) / new
            rows.append((f"{label}, {name}", step * 1e3, batch / step, floor_s / step,
                         (out.sequences == ref).float().mean().item()))
            print(f"  done {device.type} {rows[-1][0]}", file=sys.stderr, flush=True)
            torch._dynamo.reset()
        fast_decode._copies.clear()
        steps.clear()
    about = shape or "hidden 256 x 4 layers, 8 heads on 2 KV heads, vocab 32000"
    print(f"\n{device.type}: {about}, batch {batch}, prompt {prompt}, {new} new tokens, greedy,"
          f" median of {pairs}; floor = {weights / 1e9:.3f} GB of bf16 weights per step at"
          f" {bw / 1e9:.0f} GB/s (a copy, timed) = {floor_s * 1e3:.3f} ms (a compiled step also"
          f" reads the whole static KV cache, {kv / 1e9:.3f} GB); same tokens: against the plain"
          f" row of the same weights (a bf16 near-tie flips a greedy token, and the rest of that"
          f" row follows)")
    print(f"| {'rollouts':<40} | {'ms/step':>8} | {'tok/s':>8} | {'of floor':>8} |"
          f" {'same tokens':>11} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, ms, tps, frac, same in rows:
        print(f"| {name:<40} | {ms:>8.2f} | {tps:>8.0f} | {frac:>7.0%} | {same:>10.1%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--floor-only", action="store_true", help="only the weight-streaming table")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as train.py)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.floor_only:
        cuda = torch.cuda.is_available()
        return floor_table(torch.device("cuda" if cuda else "cpu"), batch=128 if cuda else 16,
                           prompt=64, new=128, pairs=3, shape="Qwen2.5-1.5B" if cuda else None)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    modes = list(MODES)
    rows = bench(cpu, torch.float32, batch=16, prompt=32, new=64, modes=modes, pairs=7)
    # The same model with a 4k vocabulary: the fp32 lm_head matmul (the same work for both sides,
    # over half of a decode step at 32k) shrinks, so the loop's own overhead shows.
    rows += bench(cpu, torch.float32, batch=16, prompt=32, new=64, modes=modes, pairs=7,
                  vocab=4096, tag=" v4k")
    setting = ["cpu: fp32, batch 16, prompt 32 (ragged), 64 new tokens, greedy, median of 7 pairs;"
               " vocab 32000 (v4k: 4096)"]
    if torch.cuda.is_available():
        rows += bench(torch.device("cuda"), torch.bfloat16, batch=64, prompt=32, new=256,
                      modes=modes, pairs=5)
        setting.append("cuda: bf16, batch 64, prompt 32 (ragged), 256 new tokens, greedy,"
                       " median of 5 pairs")
    print("\n".join(setting))
    print(f"| {'mode':<24} | {'ours tok/s':>10} | {'HF tok/s':>10} | {'ratio':>6} |"
          f" {'same tokens':>11} | {'target':<13} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 13}|{'-' * 15}|")
    for name, ours, hf, ratio, same, _ in rows:
        target = TARGETS.get(name)
        verdict = "" if target is None else \
            f">= {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
        print(f"| {name:<24} | {ours:>10.0f} | {hf:>10.0f} | {ratio:>5.2f}x | {same:>10.1%} |"
              f" {verdict:<13} |")
    floor_table(cpu, batch=16, prompt=64, new=128, pairs=3)
    if torch.cuda.is_available():
        floor_table(torch.device("cuda"), batch=128, prompt=64, new=128, pairs=3,
                    shape="Qwen2.5-1.5B")


if __name__ == "__main__":
    main()
