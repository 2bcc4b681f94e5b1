"""The parts of bench/gpu.sh: each prints its rows of the GPU table, `| figure | result |`, at its
end (nothing on a failure: gpu.sh then prints the row `failed: <its last line>`).

    python bench/gpu_parts.py check            # versions against requirements.txt, one line
    python bench/gpu_parts.py device           # the device line above the table
    python bench/gpu_parts.py rollout          # decode ms/step vs the floor vs HF generate
    python bench/gpu_parts.py step NAME -- ... # bench/train_step.py's table -> rows NAME, ...
    python bench/gpu_parts.py train NAME STEPS -- ...  # a train.py run: finished, finite
    (--dry-run before the part: tiny shapes on CPU)

Random real-shape weights (bench/train_step.py's SHAPES), the tiny model's offline tokenizer,
nothing downloaded.
"""
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check():
    """Exit 1 with one line when torch or transformers is outside requirements.txt's range."""
    def number(v):  # "2.13.0+cu128" -> (2, 13, 0)
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, _, spec = line.partition(">=")
        if name.strip() not in ("torch", "transformers"):
            continue
        low, _, high = spec.strip().partition(",<")
        try:
            have = metadata.version(name.strip())
        except metadata.PackageNotFoundError:
            have = "none"
        if have == "none" or number(have) < number(low) or high and number(have) >= number(high):
            sys.exit(f"error: bench/gpu.sh needs {line.strip()} (requirements.txt), this machine "
                     f"has {name.strip()} {have}: pip install '{line.strip()}'")


def device():
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    gpus = torch.cuda.device_count()
    print(f"{name}{f' x{gpus}' if gpus > 1 else ''}, torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}), transformers {transformers.__version__}")


def row(figure, result):
    print(f"| {figure} | {result} |")


# ------------------------------------------------------------------------------------- rollouts

def rollouts(dry):
    """ms per decode step of rollout.sample (plain, compiled) and of HF generate (DynamicCache;
    static cache, which transformers compiles on CUDA) against one read of the bf16 weights.
    bench/rollout.py's models, prompts and floor."""
    import importlib.util

    import torch
    from infra import fast_decode
    import rollout as ours

    # bench/rollout.py, under another name than the top-level rollout.py it imports
    spec = importlib.util.spec_from_file_location("rollout_bench", ROOT / "bench" / "rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bandwidth, make_model, make_prompts, streamed_bytes, timed = (
        bench.bandwidth, bench.make_model, bench.make_prompts, bench.streamed_bytes, bench.timed)

    dev = torch.device("cpu" if dry else "cuda")
    shape, batch, prompt, new, pairs = (None, 4, 16, 8, 1) if dry else \
        ("Qwen2.5-1.5B", 128, 64, 128, 2)
    floor = streamed_bytes(make_model(torch.device("meta"), torch.bfloat16, shape=shape,
                                      kv_heads=2)) / bandwidth(dev, mib=64 if dry else 512)
    results = {}

    def measure(label, run):
        run()  # warm-up: compiles
        s = statistics.median(timed(run, dev)[1] for _ in range(pairs)) / new
        results[label] = s
        print(f"  done {label}: {s * 1e3:.2f} ms/step", file=sys.stderr, flush=True)

    for dtype, autocast in [(torch.bfloat16, False), (torch.float32, True)]:
        model = make_model(dev, dtype, shape=shape, kv_heads=2)
        ids, mask = make_prompts(batch, prompt, model.config.vocab_size, dev)
        kind = "bf16 weights" if dtype == torch.bfloat16 else "fp32 + autocast (train.py's)"
        for compiled in (False, True):
            def run():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    step = fast_decode.static_step(model) if compiled else None
                    return ours.sample(model, ids, mask, new, temperature=0, step=step,
                                       check_every=new)
            measure(f"rollout.sample, {kind}, {'compiled' if compiled else 'plain'}", run)
            torch._dynamo.reset()
        if dtype == torch.bfloat16:
            for cache in ("dynamic", "static"):
                def run():
                    return model.generate(ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=new, pad_token_id=0, eos_token_id=None,
                                          cache_implementation=None if cache == "dynamic" else
                                          "static")
                name = "DynamicCache" if cache == "dynamic" else \
                    "static cache + compile (transformers' own)"
                measure(f"HF generate, bf16 weights, {name}", run)
                torch._dynamo.reset()
        fast_decode._copies.clear()
        model = None  # freed before the next one is built
    about = shape or "hidden 256 x 4 layers"
    row(f"rollout floor: {about}, batch {batch}, {prompt} + {new} tokens",
        f"{floor * 1e3:.3f} ms/step (one read of the bf16 weights at a timed copy's bandwidth)")
    for label, s in results.items():
        row(f"rollout: {label}", f"{s * 1e3:.2f} ms/step, {batch / s:.0f} tok/s, "
            f"{floor / s:.0%} of floor")


# -------------------------------------------------------------------------- training steps

def step(name, command):
    """Run bench/train_step.py (command: its argv, python or torchrun first) -> a row per mode
    of its table: rollout / score / update split, tokens/s, peak memory."""
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-4000:])
    if out.returncode:
        sys.exit(f"train_step.py exited {out.returncode}: {last_line(out.stderr)}")
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| plain", "| comp"))]
    if not rows:
        sys.exit(f"no table in train_step.py's output: {last_line(out.stdout)}")
    for line in rows:
        mode, _, rollout, main, side, score, update, total, _, tps, peak = \
            [c.strip() for c in line.strip("|").split("|")]
        row(f"{name}, {mode} rollouts", f"step {total} s: rollout {rollout} (main {main}, side "
            f"{side}) / score {score} / update {update} s; {float(tps):.0f} tok/s; peak "
            f"{float(peak) / 1024:.1f} GB")


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def train(name, steps, command):
    """Run train.py (command: its argv, python or torchrun first; --out added) and check it
    finished: `steps` rows in metrics.jsonl, every metric finite (NaN and inf are written as
    null)."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([*command, "--out", f"{out}/run"], cwd=ROOT, capture_output=True,
                              text=True)
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        if done.returncode:
            sys.exit(f"train.py exited {done.returncode}: {last_line(done.stderr)}")
        metrics = (Path(out) / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    bad = sorted({k for r in rows for k, v in r.items()
                  if v is None or isinstance(v, float) and not math.isfinite(v)})
    if len(rows) != int(steps) or bad:
        sys.exit(f"{len(rows)} of {steps} steps in metrics.jsonl; not finite: {bad or 'none'}")
    last = rows[-1]
    row(name, f"finished, {len(rows)} steps, finite metrics; last step: loss "
        f"{last.get('loss', float('nan')):.4f}, {last.get('tokens_per_s', 0):.0f} rollout tok/s, "
        f"compilations {last.get('compilations', '-')}, peak {last.get('peak_mem_mb', 0):.0f} MB")


def main(argv):
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # rollout.py: the top-level one
    part, rest = argv[0], argv[1:]
    t = time.perf_counter()
    if part == "check":
        return check()
    if part == "device":
        return device()
    if part == "rollout":
        rollouts(dry)
    elif part == "step":
        step(rest[0], rest[rest.index("--") + 1:])
    elif part == "train":
        train(rest[0], rest[1], rest[rest.index("--") + 1:])
    print(f"  {part} took {time.perf_counter() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
