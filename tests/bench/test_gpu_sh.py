"""bench/gpu.sh: its dry run (tiny shapes on CPU) gives every row of the GPU table and no failed
part; its version check refuses an older transformers in one line."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_parts", ROOT / "bench" / "gpu_parts.py")
gpu_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_parts)

# every row the table must hold (a row starts with one of these)
ROWS = ["rollout floor:", "rollout: rollout.sample, bf16 weights, plain",
        "rollout: rollout.sample, bf16 weights, compiled",
        "rollout: rollout.sample, fp32 + autocast (train.py's), plain",
        "rollout: rollout.sample, fp32 + autocast (train.py's), compiled",
        "rollout: HF generate, bf16 weights, DynamicCache",
        "rollout: HF generate, bf16 weights, static cache + compile",
        "train step tiny, plain rollouts", "train step tiny, compiled rollouts",
        "tiny FSDP offload, torchrun 1 process, rollout-rows 2, compiled rollouts",
        "train.py --compile on", "train.py under torchrun, gloo, 1 process(es)"]


@pytest.mark.slow  # ~45 s on 2 idle cores: seven parts side by side
def test_dry_run_gives_every_row_and_no_failure():
    env = dict(os.environ, GPU_SH_DRY_LIMIT="300")  # a loaded test machine: no spurious timeout
    out = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]  # no header
    assert out.stdout.startswith("GPU figures: CPU"), out.stdout[:200]
    for name in ROWS:
        assert [r for r in rows if r.startswith(f"| {name}")], (name, out.stdout)
    lora = [r for r in rows if "LoRA" in r]  # measured, or "not available" before --lora-rank
    assert len(lora) == 1 and ("LoRA r16" in lora[0] or "not available" in lora[0]), rows
    assert len(rows) == len(ROWS) + 1, out.stdout
    assert not [r for r in rows if "failed" in r], out.stdout


def test_check_refuses_an_older_transformers_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "requirements.txt").write_text("torch>=2.13\ntransformers>=5.24,<5.40\n")
    monkeypatch.setattr(gpu_parts, "ROOT", tmp_path)
    have = {"torch": "2.13.0+cu128", "transformers": "4.57.1"}
    monkeypatch.setattr(gpu_parts.metadata, "version", have.get)
    with pytest.raises(SystemExit) as e:
        gpu_parts.check()
    assert str(e.value) == ("error: bench/gpu.sh needs transformers>=5.24,<5.40 "
                            "(requirements.txt), this machine has transformers 4.57.1: "
                            "pip install 'transformers>=5.24,<5.40'")
    have["transformers"] = "5.40.0"  # above the range: refused too
    with pytest.raises(SystemExit):
        gpu_parts.check()
    have["transformers"] = "5.24.0"  # the lower bound itself, and a CUDA build's torch: fine
    assert gpu_parts.check() is None


def test_gpu_sh_stops_with_the_check(tmp_path):
    """gpu.sh exits non-zero with the check's line before any part runs (a fake python whose
    check fails)."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nif [ \"$2\" = check ]; then echo 'error: needs x' >&2; exit 1; "
                    f"fi\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr.strip(), out.stdout) == (1, "error: needs x", "")
