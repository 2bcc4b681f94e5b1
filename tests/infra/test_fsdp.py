"""infra/fsdp.py through train.py: FSDP2 over 2 gloo processes trains exactly as the hand
data-parallel path, resumes exactly, and saves plain from_pretrained folders.

The reference is the 2-process run *without* --fsdp, not a 1-process run: each rank samples its own
groups (seed + rank) and takes its token-mean over its own rows before gradients are averaged
(train.py's deviation 4), so 1 process on the same batch sees other rollouts and another
normalisation. Both 2-process paths roll out the same tokens from the same weights and average the
same per-rank gradients (all-reduce / 2 there, reduce-scatter's average here): fp32 tolerance, and
on gloo with 2 ranks they agree bit for bit. The hand path is what DDP would compute (ranks start
from the same weights and take the same steps).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
# the import itself is the support check
from torch.distributed.fsdp import fully_shard  # noqa: F401

import policy
import train
from helpers import ROOT

# --no-length-penalty: with 6-token rationales every rollout is cut, gets the same -1 and zero
# advantage
FAST = ["--batch-size", "4", "--group-size", "2", "--mini-batch-size", "2",
        "--max-new-tokens", "6", "--max-prompt-tokens", "256", "--log-rationales", "0",
        "--save-every", "2", "--no-length-penalty"]


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *FAST, *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(path):
    return policy.load(str(path))[0].state_dict()


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One plain 4-step --fsdp run (step-2, step-4, final), the reference of the tests below: a
    torchrun costs seconds of start-up, so they share it (none of them writes to it)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun("--steps", "4", "--out", str(out), "--fsdp")
    return out


@pytest.mark.slow
def test_fsdp_matches_the_hand_data_parallel_path_and_saves_plain_folders(fsdp_run, tmp_path):
    from transformers import AutoModelForCausalLM

    # a constant learning rate: step-2 of the 4-step run is a 2-step run's last step
    torchrun("--steps", "2", "--out", str(tmp_path / "ddp"))
    ddp, sharded = weights(tmp_path / "ddp" / "step-2"), weights(fsdp_run / "step-2")
    assert max_diff(ddp, sharded) < 1e-6
    assert max_diff(ddp, policy.load("tiny")[0].state_dict()) > 1e-4  # it did train
    last = weights(fsdp_run / "step-4")
    for folder, want in (("step-2", sharded), ("final", last)):  # plain, tied embeddings once
        model = AutoModelForCausalLM.from_pretrained(fsdp_run / folder)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert max_diff(model.state_dict(), want) == 0
    state = torch.load(fsdp_run / "step-2" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"]["state"]  # the full AdamW state, gathered to rank 0


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_offload_computes_the_same(fsdp_run, tmp_path):
    torchrun("--steps", "2", "--out", str(tmp_path / "cut"), "--fsdp", "--offload")
    torchrun("--steps", "4", "--out", str(tmp_path / "cut"), "--fsdp", "--resume")
    straight, cut = weights(fsdp_run / "step-4"), weights(tmp_path / "cut" / "step-4")
    assert max_diff(straight, cut) == 0
    rows = [metrics(fsdp_run), metrics(tmp_path / "cut")]
    same = [[(r["step"], r["reward"], r["loss"]) for r in run] for run in rows]
    assert same[0] == same[1] and len(same[0]) == 4


@pytest.mark.slow
def test_fsdp_compiled_rollouts_sample_the_same_rationales(fsdp_run, tmp_path):
    """--compile on under --fsdp: rollouts are compiled on fsdp's plain copy. The same seeds draw
    the same rationales as uncompiled (equal lengths and rewards); the weights agree up to the
    rounding of the compiled step (its bucket padding inside the graph), far below what the 4 steps
    moved them."""
    torchrun("--steps", "4", "--out", str(tmp_path / "compiled"), "--fsdp", "--compile", "on")
    rows = [metrics(fsdp_run), metrics(tmp_path / "compiled")]
    assert [r["compilations"] for r in rows[0]] == [0] * 4 and rows[1][-1]["compilations"] > 0
    for a, b in zip(*rows):
        assert a["rationale_len"] == b["rationale_len"] and abs(a["reward"] - b["reward"]) < 1e-4
    plain = weights(fsdp_run / "step-4")
    compiled = weights(tmp_path / "compiled" / "step-4")
    moved = max_diff(plain, policy.load("tiny")[0].state_dict())
    assert max_diff(plain, compiled) < moved / 10  # measured: 4.4e-5 against 1.2e-3


def test_fsdp_flags_need_torchrun_and_each_other(tmp_path, capsys):
    for flags, message in ((["--fsdp"], "--fsdp needs torchrun"),
                           (["--offload"], "--offload needs --fsdp")):
        with pytest.raises(SystemExit) as e:
            train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "x"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    assert not (tmp_path / "x").exists()


PLAIN_COPY_CHECK = r'''
import copy, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import policy
from infra import fsdp

dist.init_process_group("gloo")
model, tok = policy.load("tiny")
# as a checkpoint's config.json often says: the copy must stay fp32 anyway
model.config.dtype = torch.bfloat16
reference = copy.deepcopy(model)  # unsharded, the same weights
fsdp.shard(model, "cpu")
low = fsdp.sampler(model, torch.device("cpu"), torch.bfloat16)  # made: fsdp.plain_copy
# the head untied
assert low.get_output_embeddings().weight is not low.get_input_embeddings().weight
params = dict(low.named_parameters(remove_duplicate=False))
linear = {n for n, m in low.named_modules() if type(m) is torch.nn.Linear
          for n in (n + ".weight", n + ".bias")}

def check(ref):
    for name, p in ref.named_parameters(remove_duplicate=False):
        want = p.detach().to(torch.bfloat16 if name in linear else torch.float32)
        assert params[name].dtype == want.dtype and torch.equal(params[name], want), name
    ids, mask, _ = policy.build_prompts(tok, ["a short text", "another, longer text to pad"])
    # what autocast computes from the master
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)

check(reference)
with torch.no_grad():  # a step's worth of change
    for p, q in zip(model.parameters(), reference.parameters()):
        p.mul_(1.5), q.mul_(1.5)
assert fsdp.sampler(model, torch.device("cpu"), torch.bfloat16, stale=False) is low
try:
    check(reference)  # not carried over yet
    raise SystemExit("the copy followed the sharded weights without a refresh")
except AssertionError:
    pass
# refreshed in place (compiled graphs keep it)
assert fsdp.sampler(model, torch.device("cpu"), torch.bfloat16) is low
check(reference)
dist.destroy_process_group()
print("plain copy ok")
'''


@pytest.mark.slow
def test_fsdp_plain_copy_holds_the_sharded_weights_and_computes_what_autocast_does(tmp_path):
    """fsdp.plain_copy on 2 gloo ranks: Linear weights in bf16 and the rest fp32 (whatever the
    config's dtype), bit-identical logits to the unsharded master under bf16 autocast; fsdp.sampler
    refreshes it in place when told the weights may have changed."""
    script = tmp_path / "check.py"
    script.write_text(PLAIN_COPY_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(ROOT)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("plain copy ok") == 2
