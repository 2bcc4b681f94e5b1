"""One training step (rollout / score / update) on a random-initialised model of a named shape,
plain against compiled rollouts and the embedding's two paths in the same run; and the per-GPU
memory table for the release's batch.

    python bench/train_step.py                     # CPU: the "small" shape, tiny batch
    python bench/train_step.py --shape tiny --batch-size 8 --group-size 4 --compile off
                                                   # the embedding's paths, before / after
    python bench/train_step.py --shape Qwen2.5-1.5B --batch-size 64 --group-size 8 \
        --mini-batch-size 16 --micro-batch-size 2 --max-new-tokens 2048 \
        --grad-checkpointing                       # GPU: a release-shaped step
    torchrun --nproc_per_node=2 bench/train_step.py [--fsdp] [--gather-bench]
                                                   # data parallel / FSDP (gloo on CPU)
    python bench/train_step.py --shape Qwen3-4B --lora-rank 16 --rollout-rows 64 ...
                                                   # LoRA adapters (train.py's --lora-rank)
    python bench/train_step.py --memory-table      # computed, not measured (with LoRA columns)

It drives train.py's own functions (infra.cli.train_args, train.load_models, train.rl_step) on a
model saved to a temporary folder (AutoModelForCausalLM.from_config: no weights are downloaded),
with the tiny model's offline tokenizer, on the bundled sample records (infra.cli.SAMPLE_DATA).
Each mode runs one warm-up step (compilation happens there), then --steps timed steps; the table
shows their mean. --paths: policy.encode's pool_from, "forward" (before: every prompt prefilled G
times, then a second forward over the rollouts to pool and score) against "sampler" (after: each
prompt prefilled once, the pooled states and log-probs kept while sampling). The rollout stage
splits into the main rollouts (G per positive, with their embeddings) and the side ones (query,
negative); "core" = main + score + update, the part a TRL GRPO step also has (G completions, their
log-probs, the update), without GRACE's side rollouts.
Peak memory: GPU max allocated per mode on CUDA; on CPU the process's peak RSS,
which only grows (the second mode's number includes the first's).
--gather-bench (under torchrun with --fsdp): a rollout batch from fsdp's decode copy
(fsdp.plain_copy, refreshed first, what train.py does) against the sharded model gathered once,
and gathered per layer at every step.
"""
import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import cli, data, dist, fsdp, runfolder, tiny  # noqa: E402
import lora  # noqa: E402
import policy  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402

# Public config.json values of the real models (architecture only); "small" is the CPU stand-in,
# "tiny" the built-in tiny model's shape (models/tiny).
SHAPES = {
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=None,
                 tie_word_embeddings=True),
    "small": dict(model_type="qwen2", hidden_size=256, intermediate_size=1024,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=None, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(model_type="llama", hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         vocab_size=128256, tie_word_embeddings=True, head_dim=128),
    "Qwen2.5-3B": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-4B": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=151936, tie_word_embeddings=True, head_dim=128),
}


def config(shape, tokenizer):
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    kw["vocab_size"] = kw["vocab_size"] or len(tokenizer)
    return AutoConfig.for_model(kw.pop("model_type"), **kw, max_position_embeddings=8192,
                                attention_dropout=0.0, bos_token_id=None,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)


@functools.lru_cache(maxsize=None)
def parameter_count(shape):
    """-> (parameters (a tied head counted once), of which the output head, in nn.Linear layers
    (what autocast casts and a decode copy holds in bf16), and what an untied fp32 decode copy
    keeps besides: norms, and the embedding table even when the head is tied to it)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(shape, tiny.build_tokenizer()))
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    linear = sum(p.numel() for m in model.modules() if type(m) is torch.nn.Linear
                 for p in m.parameters())
    P = sum(p.numel() for p in model.parameters())
    return P, head.numel(), linear, P - linear + (embedding.numel() if head is embedding else 0)


# ------------------------------------------------------------------------------ the timed step

def save_random_model(shape, folder):
    from transformers import AutoModelForCausalLM

    tok = tiny.build_tokenizer()
    torch.manual_seed(0)
    # a 4B model initialises in seconds on a GPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config(shape, tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def one_mode(folder, compile, opts, rank, world, steps, pool_from="sampler"):
    args, _ = cli.train_args(["--model", folder, "--compile", compile, *opts])
    if world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, tok, ref = train.load_models(args, None)
    opt = runfolder.optimizer(model, args)  # train.py's: AdamW over the trainable parameters
    records = data.load_records(cli.SAMPLE_DATA, "supervised")
    local = args.batch_size // world
    batch = [records[i % len(records)] for i in range(rank * local, (rank + 1) * local)]
    gen = torch.Generator(device=args.device).manual_seed(rank)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    encode, split, runs = policy.encode, {}, []

    def timed_encode(*a, **kw):  # the main rollouts pass logprob_temperature, the side ones not
        t = time.perf_counter()
        out = encode(*a, pool_from=pool_from, **kw)
        key = "t_main" if "logprob_temperature" in kw else "t_side"
        split[key] += time.perf_counter() - t
        return out
    policy.encode = timed_encode
    try:
        for _ in range(steps + 1):
            split.update(t_main=0.0, t_side=0.0)
            runs.append(dict(train.rl_step(model, ref, tok, opt, batch, args, gen, world)[0],
                             **split))
    finally:
        policy.encode = encode
    runs = runs[1:]
    m = {k: statistics.mean(r[k] for r in runs)
         for k in ("t_rollout", "t_main", "t_side", "t_score", "t_update", "tokens_per_s")}
    m["peak_mb"] = dist.peak_memory_mb()
    if world > 1:
        m = dist.average_over_ranks(m, world)
    return m, model, tok, args


def gather_bench(model, tok, args, world, new=16, repeats=3):
    """Seconds per rollout batch of `new` tokens on the sharded model: from fsdp's decode copy
    (fsdp.plain_copy, refreshed first, what train.py does), on the model gathered once, and
    gathering per layer at every step."""
    ids, mask, _ = policy.build_prompts(tok, ["a short text"] * 8)
    ids, mask = ids.to(args.device), mask.to(args.device)

    def timed(module, before=lambda: None):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            before()
            # no EOS: the same steps on all ranks
            rollout.sample(module(), ids, mask, new, temperature=0.0, eos_token_id=None)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    low = fsdp.sampler(model, args.device)
    # refreshed, as after an optimizer step
    copy = timed(lambda: low, before=lambda: fsdp.refresh(low, model))
    refreshes = []
    for _ in range(repeats):  # the price of the copy: one refresh, a unit at a time
        t = time.perf_counter()
        fsdp.refresh(low, model)
        refreshes.append(time.perf_counter() - t)
    once = timed(lambda: model, before=lambda: fsdp.reshard(model))
    # every unit gathers and frees itself per forward
    switch, fsdp._switch = fsdp._switch, lambda *a, **k: None
    fsdp.reshard(model)
    for unit in fsdp.units(model):
        unit.set_reshard_after_forward(True, recurse=False)
    try:
        per_step = timed(lambda: model)
    finally:
        fsdp._switch = switch
        fsdp.reshard(model)
    return copy, once, per_step, statistics.median(refreshes)


def bench(a):
    rank, world = 0, 1
    opts = ["--batch-size", str(a.batch_size), "--group-size", str(a.group_size),
            "--mini-batch-size", str(a.mini_batch_size), "--max-new-tokens", str(a.max_new_tokens),
            "--max-prompt-tokens", "512", "--no-length-penalty", "--lr", "1e-6",
            "--threads", str(a.threads)]
    opts += ["--micro-batch-size", str(a.micro_batch_size)] if a.micro_batch_size else []
    opts += ["--grad-checkpointing"] if a.grad_checkpointing else []
    opts += ["--rollout-rows", str(a.rollout_rows)] if a.rollout_rows else []
    opts += ["--fsdp"] if a.fsdp else []
    opts += ["--offload"] if a.offload else []
    opts += ["--lora-rank", str(a.lora_rank)] if a.lora_rank else []
    if "RANK" in os.environ:
        args = cli.train_args(["--threads", str(a.threads)])[0]
        rank, world, args.device = dist.setup(args.device, args.threads)
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            save_random_model(a.shape, folder)
        if world > 1:  # one folder for all ranks: rank 0's
            names = [folder]
            torch.distributed.broadcast_object_list(names)
            folder = names[0]
            torch.distributed.barrier()
        rows = {}
        for mode in a.compile.split(","):
            for path in a.paths.split(","):
                model = None  # free the previous mode's model (and its decode copy) first
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                rows[mode, path], model, tok, args = one_mode(folder, mode, opts, rank, world,
                                                              a.steps, path)
        gathered = gather_bench(model, tok, args, world) if a.gather_bench and a.fsdp else None
        if world > 1:
            torch.distributed.barrier()
    if rank:
        return
    how = f"{' FSDP' if a.fsdp else ''}{' offload' if a.offload else ''}" + \
        (f" LoRA r{a.lora_rank}" if a.lora_rank else "")
    print(f"shape {a.shape}, {world} process(es){how} on {args.device}; {a.batch_size} texts x "
          f"G={a.group_size}, {a.max_new_tokens} new tokens, mean of {a.steps}")
    print("| rollouts | embedding | rollout s | main s | side s | score s | update s | step s | "
          "core s | tok/s | peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, path), m in rows.items():
        m["step"] = m["t_rollout"] + m["t_score"] + m["t_update"]
        m["core"] = m["t_main"] + m["t_score"] + m["t_update"]
        print(f"| {'compiled' if mode == 'on' else 'plain'} | {path} | {m['t_rollout']:.3f} | "
              f"{m['t_main']:.3f} | {m['t_side']:.3f} | {m['t_score']:.3f} | "
              f"{m['t_update']:.3f} | {m['step']:.3f} | {m['core']:.3f} | "
              f"{m['tokens_per_s']:.1f} | {m['peak_mb']:.0f} |")
    for mode in a.compile.split(","):
        if (mode, "forward") in rows and (mode, "sampler") in rows:
            old, new = rows[mode, "forward"], rows[mode, "sampler"]
            print(f"{'compiled' if mode == 'on' else 'plain'}: sampler / forward: step "
                  f"{new['step'] / old['step']:.2f}x, main rollouts "
                  f"{new['t_main'] / old['t_main']:.2f}x, core {new['core'] / old['core']:.2f}x")
    if ("on", "sampler") in rows and ("off", "sampler") in rows:
        ratio = rows["on", "sampler"]["tokens_per_s"] / rows["off", "sampler"]["tokens_per_s"]
        print(f"compiled / plain rollout tokens/s: {ratio:.2f}x")
    if gathered:
        print(f"rollout of 8 rows x 16 tokens: decode copy {gathered[0]:.3f} s (its refresh alone "
              f"{gathered[3] * 1e3:.1f} ms), sharded model gathered once {gathered[1]:.3f} s, "
              f"gathered per layer per step {gathered[2]:.3f} s")


# ---------------------------------------------------------------------------- the memory table

# what a job can use: 80 GB less CUDA context, NCCL buffers, fragmentation
GPU_GB, HEADROOM_GB = 80, 8
# the release's batch; 2 prompts per forward
PROMPT, NEW, PROMPTS, G, MICRO_PROMPTS = 512, 2048, 64, 8, 2


def memory_gb(shape, mode, n, rollout_rows=0, lora_rank=0):
    """Peak GB per GPU = max(rollout phase, update phase) for mode plain | fsdp | offload | lora
    over n GPUs. Bytes per parameter: fp32 weights 4, grads 4 (kept from the step through the next
    rollouts: zero_grad comes at the next update), AdamW 8 -> 16, all on the GPU (plain), / n
    (fsdp), on the host (offload). The bf16 reference: 2, replicated (what train.py does). bf16
    autocast holds a cast (2) of every Linear parameter a forward uses until its backward is done.
    Rollouts run on a decode copy, kept: plain, fast_decode.decode_copy (bf16 Linears, 2); FSDP,
    fsdp.plain_copy (bf16 Linears 2, the rest fp32 4: mostly the embedding table).
    Scoring/updates under FSDP gather the root unit (embeddings+head) and two layers at a time.
    KV cache (bf16) for this rank's 64 x 8 / n main rollouts of 512 + 2048 tokens, or for
    rollout_rows of them at a time (--rollout-rows); activations with
    gradient checkpointing for a micro-batch of 2 prompts x 8 = 16 rows x 2560 tokens: each layer's
    fp32 input (L x tokens x H x 4), one layer's recompute (tokens x (4H + 3I) x 2 bytes), the fp32
    last hidden states, and fp32 logits for 1024 scored tokens (x3: logits, log-softmax, grad).
    lora (rank lora_rank, plain, one GPU): the frozen base as train.py keeps it (lora.add freezes
    the policy policy.load loaded: fp32, 4); fp32 adapters + grads + AdamW (16) for the adapters
    only; no reference (the same model, adapters off); the decode copy as plain (the merged
    weights in bf16); autocast keeps no casts of frozen weights (it caches those of leaves that
    need grad only), so the update holds the casts one layer's and the head's backward need; KV
    cache and activations as plain."""
    c = SHAPES[shape]
    P, head, linear, rest = parameter_count(shape)
    L, H, I, V = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim", H // c["num_attention_heads"])
    tokens = PROMPT + NEW
    rows = PROMPTS * G / n if not rollout_rows else min(rollout_rows, PROMPTS * G / n)
    kv = rows * tokens * L * 2 * c["num_key_value_heads"] * head_dim * 2
    micro = MICRO_PROMPTS * G * tokens
    act = micro * (L * H * 4 + (4 * H + 3 * I) * 2 + H * 4) + 1024 * V * 4 * 3
    layer = (P - head) / L
    if mode == "lora":
        states = 4 * P + 16 * adapter_count(shape, lora_rank)
        copy, casts = 2 * linear, 2 * (head + layer)
        return max(states + copy + kv, states + copy + casts + act) / 1e9, P
    states = {"plain": 16 * P, "fsdp": 16 * P / n, "offload": 0}[mode]
    ref = 2 * P
    copy = 2 * linear + (0 if mode == "plain" else 4 * rest)  # kept through the update
    gathered = 0 if mode == "plain" else (4 + 2) * (head + 2 * layer)  # fp32 + autocast's casts
    rollout_phase = states + ref + copy + kv
    update_phase = states + ref + copy + 2 * linear * (mode == "plain") + gathered + act
    return max(rollout_phase, update_phase) / 1e9, P


@functools.lru_cache(maxsize=None)
def adapter_count(shape, r):
    """LoRA parameters: r x (in + out) per Linear lora.py adapts by default (attention and MLP
    projections; A: r x in, B: out x r)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(shape, tiny.build_tokenizer()))
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name.rsplit(".", 1)[-1] in lora.TARGETS)


def memory_table():
    print(f"Per-GPU peak, GB (computed, not measured): {PROMPTS} prompts x G={G}, {NEW}-token "
          f"rationales after {PROMPT}-token prompts, micro-batches of {MICRO_PROMPTS} prompts, "
          f"gradient checkpointing; fits = at most {GPU_GB - HEADROOM_GB} of {GPU_GB} GB.")
    runs = [(mode, n) for mode in ("plain", "fsdp", "offload") for n in (1, 4, 8)]
    ranks = (16, 64)
    for rollout_rows in (0, 64):
        print("\nAll of a rank's rollouts sampled at once (the default):\n" if not rollout_rows
              else f"\n--rollout-rows {rollout_rows}: a rank samples {rollout_rows} rollouts at a "
              "time:\n")
        print("| model | params | " + " | ".join(f"{m} x{n}" for m, n in runs) + " | "
              + " | ".join(f"lora r{r} x1" for r in ranks) + " |")
        print("|---|---|" + "---|" * (len(runs) + len(ranks)))
        for shape in [s for s in SHAPES if s not in ("small", "tiny")]:
            cells = []
            for mode, n, r in [(m, n, 0) for m, n in runs] + [("lora", 1, r) for r in ranks]:
                gb, P = memory_gb(shape, mode, n, rollout_rows, r)
                cells.append(f"{gb:.0f} {'fits' if gb <= GPU_GB - HEADROOM_GB else 'no'}")
            print(f"| {shape} | {P / 1e9:.2f}B | " + " | ".join(cells) + " |")
    print("\nBytes/param per GPU: plain 16 + 2 (bf16 ref) + 2 (decode copy), +2 autocast casts in "
          "the update; FSDP 16/N + 2 + 2 (decode copy; its embedding table 4), + two gathered "
          "layers in the update; offload 0 + 2 + 2 (the 16 live in host RAM: 16/N per rank).")
    print("plain x N is the hand data-parallel path: full states on every GPU, KV cache for "
          "rows / N.")
    counts = ", ".join(f"{s} " + "/".join(f"{adapter_count(s, r) / 1e6:.0f}M" for r in ranks)
                       for s in SHAPES if s not in ("small", "tiny"))
    print("lora rR x1: --lora-rank R on q,k,v,o,gate,up,down, one GPU: the frozen base 4 "
          "(fp32, as policy.load loads it) + 2 (decode copy), no reference, 16 per adapter "
          f"parameter, + the casts of one layer and the head in the update; adapter parameters "
          f"(r = {'/'.join(map(str, ranks))}): {counts}.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=list(SHAPES))
    p.add_argument("--compile", default="off,on",
                   help="rollout modes to run, in order: off, on or off,on")
    p.add_argument("--paths", default="forward,sampler",
                   help="policy.encode's pool_from to run, in order: forward (before: G prefills "
                        "and a second forward), sampler (after: each thing computed once)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--mini-batch-size", type=int, default=None, help="default: the batch per rank")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--rollout-rows", type=int, default=0,
                   help="train.py's --rollout-rows (0: all rows at once)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train.py's --lora-rank: LoRA adapters of this rank (0: full fine-tuning)")
    p.add_argument("--gather-bench", action="store_true",
                   help="with --fsdp: time rollouts from the decode copy against the sharded "
                        "model's own")
    p.add_argument("--memory-table", action="store_true")
    a = p.parse_args(argv)
    if a.memory_table:
        return memory_table()
    a.mini_batch_size = a.mini_batch_size or a.batch_size // int(os.environ.get("WORLD_SIZE", 1))
    try:
        bench(a)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
