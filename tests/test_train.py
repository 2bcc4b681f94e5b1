"""train.py: the GRPO math against float64 formulas, one policy-gradient step, the CLI end to end.

The parser itself (infra/cli.py) is tested in tests/infra/test_cli.py, the logged diagnostics
(infra/diagnostics.py) in tests/infra/test_diagnostics.py.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import policy
import train
from helpers import ROOT, shared_data
from infra import cli, data

FAST = ["--batch-size", "4", "--group-size", "2", "--mini-batch-size", "2",
        "--max-new-tokens", "6", "--max-prompt-tokens", "256", "--log-rationales", "0",
        "--save-every", "2"]


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_match_formula():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, -1.0, -1.0, -1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    got = train.group_advantages(r, 4)
    rd = r.double().reshape(3, 4)
    want = (rd - rd.mean(1, keepdim=True)).reshape(-1)
    assert torch.allclose(got.double(), want, atol=1e-6)
    scaled = train.group_advantages(r, 4, scale_by_std=True)
    pop_std = ((rd - rd.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True).sqrt()  # population std
    want_scaled = ((rd - rd.mean(1, keepdim=True)) / (pop_std + 1e-6)).reshape(-1)
    assert torch.allclose(scaled.double(), want_scaled, atol=1e-5)
    assert torch.equal(scaled[4:8], torch.zeros(4))  # a zero-variance group: 0, not NaN
    g1 = train.group_advantages(torch.tensor([3.0, -2.0]), 1, scale_by_std=True)
    assert torch.equal(g1, torch.zeros(2))  # G = 1: no baseline signal, no NaN


# ----------------------------------------------------------------------------- loss

def reference_loss(logp, old, ref, adv, mask, eps, coef, kl_type, aggregation, L, dual_clip):
    """float64, token by token, as method.md writes it."""
    B, T = logp.shape
    per = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            rho = torch.exp(logp[b, t] - old[b, t])
            A = adv[b]
            pg = torch.maximum(-rho * A, -torch.clamp(rho, 1 - eps, 1 + eps) * A)
            if dual_clip is not None and A < 0:
                pg = torch.minimum(pg, -dual_clip * A)
            d = ref[b, t] - logp[b, t]
            k = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_type]
            per[b, t] = pg + coef * k
    m = mask.double()
    if aggregation == "token":
        return (per * m).sum() / m.sum()
    if aggregation == "sequence":
        return torch.stack([(per[b] * m[b]).sum() / m[b].sum() for b in range(B)]).mean()
    return (per * m).sum() / (B * L)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_policy_loss_value_and_gradient_match_float64(kl_type, aggregation):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3)
    # ratios inside and outside the clip
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    kw = dict(eps=0.2, coef=0.05, kl_type=kl_type, aggregation=aggregation, L=10, dual_clip=3.0)
    x = logp.clone().float().requires_grad_(True)
    loss, stats = train.policy_loss(x, old.float(), ref.float(), adv.float(), mask, clip_eps=0.2,
                                    kl_coef=0.05, kl_type=kl_type, aggregation=aggregation,
                                    max_new_tokens=10, dual_clip=3.0)
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    want = reference_loss(x64, old, ref, adv, mask, **kw)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    assert (x.grad[mask == 0] == 0).all()


def test_clip_is_active_exactly_outside_the_trust_region_with_the_advantage_sign():
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]])
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2, 4)
    logp = ratios.log().requires_grad_(True)
    loss, stats = train.policy_loss(logp, old, None, adv, torch.ones(2, 4), clip_eps=0.2,
                                    kl_coef=0.0, aggregation="constant", max_new_tokens=1,
                                    dual_clip=None)
    loss.backward()
    # A > 0: gradient vanishes only where the ratio is already above 1 + eps; A < 0: below 1 - eps
    flat = logp.grad == 0
    assert flat.tolist() == [[False, False, False, True], [True, False, False, False]]
    assert stats["clip_frac"] == pytest.approx(2 / 8)
    # elsewhere d loss / d logp = -A * ratio (sum / (B * 1))
    assert torch.allclose(logp.grad[~flat], (-adv[:, None] * ratios / 2).expand(2, 4)[~flat])


def test_dual_clip_caps_negative_advantage_loss():
    logp = torch.tensor([[2.0]]).requires_grad_(True)  # ratio e^2 = 7.4 > 3
    loss, _ = train.policy_loss(logp, torch.zeros(1, 1), None, torch.tensor([-1.0]),
                                torch.ones(1, 1), kl_coef=0.0, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert logp.grad.item() == 0


def test_an_exploded_ratio_and_kl_are_clamped_as_verl_does():
    """verl's guards: the log-ratio logp - old in [-20, 20] before exp; low_var_kl: d = ref - logp
    in [-20, 20], then k3 in [-10, 10]. Exploded (60, and 100 where exp overflows float32): a
    finite loss and gradient, and the values of the clamped formula, written out by hand."""
    for big in (60.0, 100.0):
        for A, dual in ((1.0, 3.0), (-1.0, None)):
            logp = torch.tensor([[-1.0]], requires_grad=True)
            old, ref = logp.detach() - big, logp.detach() + big  # logp - old = ref - logp = big
            loss, stats = train.policy_loss(logp, old, ref, torch.tensor([A]), torch.ones(1, 1),
                                            clip_eps=0.2, kl_coef=0.5, dual_clip=dual)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (big, A)
            rho = math.exp(20)  # the clamped ratio
            pg = -1.2 * A if A > 0 else rho * -A  # A > 0: the clip at 1 + eps; A < 0, no dual clip
            assert loss.item() == pytest.approx(pg + 0.5 * 10.0, rel=1e-6)  # k3 capped at 10
            assert logp.grad.item() == 0  # every clamp saturated: no gradient
            assert stats["ratio"] == pytest.approx(rho, rel=1e-6)


def test_values_inside_the_clamps_are_the_unclamped_formula():
    """Near the edges, inside: log-ratio 19.5 and -19.5, d = ref - logp where k3 is just below 10
    (2.5: e^2.5 - 3.5 = 8.68; -9: e^-9 + 8 = 8.0001) and small: value and gradient are those of
    the plain formulas (float64, by hand)."""
    log_ratio = torch.tensor([[19.5, -19.5, 0.3, -0.2]], dtype=torch.float64)
    d = torch.tensor([[2.5, -9.0, 0.1, -0.4]], dtype=torch.float64)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    old, ref = logp.detach() - log_ratio, logp.detach() + d
    for A in (1.0, -1.0):
        x = logp.detach().clone().requires_grad_(True)
        loss, _ = train.policy_loss(x, old, ref, torch.tensor([A], dtype=torch.float64),
                                    torch.ones(1, 4), clip_eps=0.2, kl_coef=0.1, dual_clip=None)
        (got,) = torch.autograd.grad(loss, x)
        y = logp.detach().clone().requires_grad_(True)
        rho = torch.exp(y - old)  # no clamp
        k = ref - y
        per = torch.maximum(-rho * A, -rho.clamp(0.8, 1.2) * A) + 0.1 * (torch.exp(k) - k - 1)
        want = per.mean()
        (expected,) = torch.autograd.grad(want, y)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert torch.allclose(got, expected, rtol=1e-6)
    k3 = train.kl_estimate(logp.detach(), ref, "k3")
    assert torch.allclose(k3, torch.exp(d) - d - 1, rtol=1e-12)  # none reaches the cap of 10
    assert (k3 < 10).all() and k3[0, 0].item() == pytest.approx(math.exp(2.5) - 3.5)


def test_constant_aggregation_uses_the_fixed_normaliser_not_the_padded_width():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = train.policy_loss(logp, torch.zeros(2, 3), None, torch.tensor([1.0, 1.0]),
                                torch.ones(2, 3), kl_coef=0.0, aggregation="constant",
                                max_new_tokens=50)
    assert loss.item() == pytest.approx(-6 / (2 * 50))


# ----------------------------------------------------------------------------- one update on tiny

def test_one_policy_gradient_step_moves_logprobs_with_the_advantage_sign():
    model, tok = policy.load("tiny")
    train.disable_dropout(model)
    ids, mask, _ = policy.build_prompts(tok, ["A dog runs.", "A dog runs."])
    # two different "rationales" for the same prompt
    completion = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seqs = torch.cat([ids, completion], 1)
    am = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    cm = torch.cat([torch.zeros_like(mask), torch.ones(2, 3, dtype=mask.dtype)], 1)
    adv = torch.tensor([1.0, -1.0])
    before = policy.token_logprobs(model, seqs, am, cm).sum(-1).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp = policy.token_logprobs(model, seqs, am, cm)
    loss, _ = train.policy_loss(lp, lp.detach(), None, adv, cm, kl_coef=0.0)
    assert abs(loss.item()) < 1e-6  # on-policy: the value is ~0 while the gradient is not
    loss.backward()
    opt.step()
    after = policy.token_logprobs(model, seqs, am, cm).sum(-1).detach()
    assert after[0] > before[0] and after[1] < before[1]


# ----------------------------------------------------------------------------- end to end

def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def metrics(out):
    """The rows of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return policy.load(str(path))[0].state_dict()


@pytest.mark.slow
def test_steps_write_metrics_and_a_loadable_checkpoint_and_resume_is_exact(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train.main([*FAST, "--steps", "4", "--out", str(full)])
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "reward/positive", "loss", "kl", "clip_frac", "rationale_len",
                "truncated_frac", "t_rollout", "t_score", "t_update", "peak_mem_mb",
                "cos_between_texts", "distinct_token_ratio"):
        assert key in rows[0], key
    model, tok = policy.load(str(full / "step-4"))
    assert tok.padding_side == "left"
    # an interrupted run: 2 steps, then resume to 4 -> bit-for-bit the same weights
    train.main([*FAST, "--steps", "2", "--out", str(half)])
    train.main([*FAST, "--steps", "4", "--out", str(half), "--resume"])
    a, b = model.state_dict(), weights(half / "step-4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (half / "metrics.jsonl").read_text() .count("\n") == 4
    assert metrics(half)[-1]["reward"] == rows[-1]["reward"]


def test_unsupervised_mode_and_infonce_reward_run(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("A cat sleeps.\nThe sky is blue.\n\nRain falls in autumn.\n"
                    "Birds sing at dawn.\n")
    train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "u"), "--mode", "unsupervised",
                "--data", str(data)])
    train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "i"), "--reward", "infonce",
                "--kl-coef", "0"])
    assert (tmp_path / "u" / "step-1" / "model.safetensors").exists()
    assert "reward/logsumexp" in json.loads((tmp_path / "i" / "metrics.jsonl").read_text())


def torchrun(script, *args, env=None):
    """`torchrun --nproc_per_node=2 script args` on gloo (CPU), from the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
           "--nproc_per_node=2", str(script), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def adam_steps(checkpoint):
    """AdamW's per-parameter step counts of a checkpoint (the optimizer steps taken)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


@pytest.mark.slow
def test_two_process_torchrun_gloo(tmp_path):
    """--batch-size and --mini-batch-size are global: 2 processes take the optimizer steps of 1
    (batch 4 / mini 2 = 2 per rollout batch: each rank's 2 texts in mini-batches of 1)."""
    res = torchrun(ROOT / "train.py", *FAST, "--steps", "2", "--out", str(tmp_path / "ddp"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "ddp" / "step-2" / "model.safetensors").exists()
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
    train.main([*FAST, "--steps", "2", "--out", str(tmp_path / "one")])
    assert adam_steps(tmp_path / "one" / "step-2") == {4}  # 2 rollout batches x 4 / 2
    assert adam_steps(tmp_path / "ddp" / "step-2") == {4}  # per rank (and per-rank mini 2 x 2)
    assert all(r["skipped"] == 0 for r in metrics(tmp_path / "ddp"))


SPY = """import json, os, sys
import policy, train
seen, real = [], policy.encode
def encode(*a, **k):  # on-policy: the main rollouts' old log-probs are not computed
    seen.append(k.get("logprob_temperature"))
    return real(*a, **k)
policy.encode = encode
try:
    train.main(sys.argv[1:])
finally:
    with open(os.environ["SPY"] + "." + os.environ.get("RANK", "0"), "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.slow
def test_two_processes_match_one_where_the_math_allows(tmp_path, monkeypatch):
    """Where sampling cannot differ, 2 ranks give the weights of 1 process. Deterministic rollouts
    (--top-k 1: each rank's own seed no longer matters) make a group's rows identical, so every
    advantage is 0 and the gradient is the KL term's (k1: not 0 at the first step); sequence-mean
    is a sum over rows / rows, which averaging the ranks' gradients keeps. One mini-batch per
    rollout batch: the on-policy shortcut, judged on each rank's share (mini / N texts). (Sampled
    rollouts cannot match: each rank draws its own groups with its own seed, its cross-group
    terms see its own groups, and the token-mean is per rank.)"""
    flags = [*FAST, "--mini-batch-size", "4", "--top-k", "1", "--kl-type", "k1",
             "--aggregation", "sequence", "--steps", "2"]
    (tmp_path / "spy.py").write_text(SPY)
    res = torchrun(tmp_path / "spy.py", *flags, "--out", str(tmp_path / "ddp"),
                   env={"SPY": str(tmp_path / "seen")})
    assert res.returncode == 0, res.stderr[-2000:]
    for rank in (0, 1):  # main and side encodes, both steps, none scoring old log-probs
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        assert len(seen) == 4 and seen == [None] * 4, seen
    train.main([*flags, "--out", str(tmp_path / "one")])
    assert adam_steps(tmp_path / "one" / "step-2") == adam_steps(tmp_path / "ddp" / "step-2") \
        == {2}
    one, ddp = weights(tmp_path / "one" / "step-2"), weights(tmp_path / "ddp" / "step-2")
    initial = policy.load("tiny")[0].state_dict()
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-4  # it moved
    assert all(torch.allclose(one[k], ddp[k], atol=1e-6) for k in one)
    assert all(r["adv_abs"] == 0 for r in metrics(tmp_path / "ddp"))


GOOD = '{"query": "q", "positive": "p", "negative": "n"}\n'


@pytest.mark.parametrize("content,message", [
    (GOOD + '{"query": "q", "positive": "p"\n', "bad.jsonl:2: invalid JSON"),
    (GOOD + '{"query": "q", "positive": "p"}\n', "bad.jsonl:2: field 'negative'"),
    ('{"query": "q", "positive": "", "negative": "n"}\n',
     "bad.jsonl:1: field 'positive' is empty"),
    ('{"query": 3, "positive": "p", "negative": "n"}\n',
     "bad.jsonl:1: field 'query' (or 'anchor') must be a string"),
    ("\n\n", "no records"),
])
def test_bad_data_gives_one_clear_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    err = one_line_exit(capsys, ["--data", str(tmp_path / "bad.jsonl"), "--out",
                                 str(tmp_path / "out")])
    assert message in err and not (tmp_path / "out").exists(), err


def test_bad_paths_and_resume_and_existing_runs(tmp_path, capsys):
    err = one_line_exit(capsys, ["--data", str(tmp_path / "missing.jsonl"), "--out",
                                 str(tmp_path / "o")])
    assert "missing.jsonl: no such file" in err
    err = one_line_exit(capsys, [*FAST, "--model", str(tmp_path / "no-model"), "--out",
                                 str(tmp_path / "o")])
    assert "no-model" in err
    err = one_line_exit(capsys, ["--resume", "--out", str(tmp_path / "empty")])
    assert "no checkpoint" in err
    existing = tmp_path / "existing"
    (existing / "step-3").mkdir(parents=True)
    (existing / "metrics.jsonl").write_text('{"step": 3}\n')
    err = one_line_exit(capsys, ["--out", str(existing), *FAST, "--steps", "1"])
    assert "--resume" in err
    assert (existing / "metrics.jsonl").read_text() == '{"step": 3}\n'
    assert os.listdir(existing / "step-3") == []


def test_snli_triplets_with_aliases_load():
    path = shared_data("snli_triplets", "triplets.jsonl")
    records = data.load_records(str(path), "supervised")
    assert len(records) > 6000 and set(records[0]) == {"query", "positive", "negative"}


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, "--steps", "1000",
                             "--save-every", "1000", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert (out / f"step-{steps}" / "trainer_state.pt").exists()  # every finished step is kept
    assert not list(out.glob(".tmp-*"))
    # the step in flight was finished before saving: the checkpoint is exactly step N of a plain
    # run
    train.main([*FAST, "--steps", str(steps), "--out", str(tmp_path / "plain")])
    a, b = weights(out / f"step-{steps}"), weights(tmp_path / "plain" / f"step-{steps}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_one_big_micro_batch_and_no_reference_without_kl(
        tmp_path, monkeypatch):
    loads = []
    real_load = policy.load
    monkeypatch.setattr(train.policy, "load",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    train.main([*FAST, "--steps", "1", "--kl-coef", "0", "--out", str(tmp_path / "one")])
    assert len(loads) == 1  # the policy only: kl_coef 0 loads no reference model
    train.main([*FAST, "--steps", "1", "--kl-coef", "0", "--micro-batch-size", "1",
                "--out", str(tmp_path / "acc")])
    a = policy.load(str(tmp_path / "one" / "step-1"))[0].state_dict()
    b = policy.load(str(tmp_path / "acc" / "step-1"))[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # it did move
    assert any(not torch.equal(a[k], real_load("tiny")[0].state_dict()[k]) for k in a)


@pytest.mark.slow
def test_eval_every_logs_sts_spearman_and_bad_batch_sizes_are_refused(tmp_path, capsys):
    sts = shared_data("stsbenchmark", "dev.jsonl")
    train.main([*FAST, "--steps", "1", "--eval-every", "1", "--eval-pairs", "8",
                "--eval-data", str(sts), "--out", str(tmp_path / "e")])
    row = json.loads((tmp_path / "e" / "metrics.jsonl").read_text())
    assert -100 <= row["sts_dev"] <= 100 and "sts_dev_spearman" not in row  # evaluate's x100
    err = one_line_exit(capsys, [*FAST, "--batch-size", "5", "--out", str(tmp_path / "b")])
    assert "--batch-size 5" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content,message", [
    ('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b"}\n',
     "sts.jsonl:2: field 'score' is missing"),
    ('{"sentence1": "a", "sentence2": 7, "score": 1}\n',
     "sts.jsonl:1: field 'sentence2' must be a string"),
    ('{"sentence1": "a", "sentence2": "b", "score": 1}\n', "at least 2 pairs"),
])
def test_bad_eval_data_is_refused_before_anything_is_written(tmp_path, capsys, content,
                                                             message):
    (tmp_path / "sts.jsonl").write_text(content)
    err = one_line_exit(capsys, [*FAST, "--eval-every", "1", "--eval-data",
                                 str(tmp_path / "sts.jsonl"), "--out", str(tmp_path / "o")])
    assert message in err, err
    assert not (tmp_path / "o").exists()
    err = one_line_exit(capsys, [*FAST, "--eval-every", "1", "--eval-data",
                                 str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert "none.jsonl: no such file" in err
    assert not (tmp_path / "o").exists()


def test_resume_reports_changed_settings_and_survives_a_cut_metrics_line(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "2", "--out", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # a kill in the middle of writing step 3's line
    capsys.readouterr()
    train.main([*FAST, "--steps", "3", "--out", str(out), "--resume", "--lr", "1e-4",
                "--save-every", "5"])
    printed = capsys.readouterr().out
    assert "--lr 0.0003 -> 0.0001" in printed  # announced ...
    saved = torch.load(out / "step-3" / "trainer_state.pt", weights_only=False)
    assert {g["lr"] for g in saved["optimizer"]["param_groups"]} == {1e-4}  # ... and applied
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_prompt_limit_below_the_template_is_refused_before_anything_is_written(tmp_path,
                                                                              capsys):
    err = one_line_exit(capsys, [*FAST, "--max-prompt-tokens", "5", "--out",
                                 str(tmp_path / "o")])
    assert "--max-prompt-tokens 5" in err
    assert not (tmp_path / "o").exists()


def test_rollouts_run_under_the_training_autocast(tmp_path, monkeypatch):
    """On a GPU the scoring forwards run under bf16 autocast; the rollouts must too (speed, and
    the same numerics for sampling and scoring). Checked on CPU by watching policy.autocast's
    context."""
    import contextlib

    import rollout

    active, seen = [], []
    real_autocast, real_sample = policy.autocast, rollout.sample

    @contextlib.contextmanager
    def watched(device):
        active.append(torch.device(device).type)
        with real_autocast(device):
            yield
        active.pop()

    monkeypatch.setattr(policy, "autocast", watched)
    monkeypatch.setattr(rollout, "sample",
                        lambda *a, **k: seen.append(list(active)) or real_sample(*a, **k))
    train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "o")])
    # main and side rollouts, each inside one
    assert len(seen) == 2 and all(s == ["cpu"] for s in seen)


# ----------------------------------------------------------------------------- the system prompt

# The release's prompt, quoted from GasolSun36/GRACE (rl_dataset.py PROMPT2, eval_mteb.py PROMPT).
RELEASE_TEXT = ("Read and analyze the following text, then you need to provide your reasoning "
                "within <think></think> tags. Finally, generate a comprehensive understanding of "
                "this text.")


def watch_prompts(monkeypatch):
    """-> (the system_prompt of every policy.build_prompts call, the prompt ids of every
    rollout.sample call), filled as training runs."""
    import rollout

    prompts, sampled = [], []
    real_build, real_sample = policy.build_prompts, rollout.sample

    def build(tokenizer, texts, system_prompt=policy.DEFAULT_SYSTEM_PROMPT, *a, **k):
        prompts.append(system_prompt)
        return real_build(tokenizer, texts, system_prompt, *a, **k)

    monkeypatch.setattr(policy, "build_prompts", build)
    monkeypatch.setattr(rollout, "sample", lambda model, ids, mask, *a, **k:
                        sampled.append(ids[mask.bool()]) or real_sample(model, ids, mask, *a, **k))
    return prompts, sampled


def sts_file(path, pairs=4):
    path.write_text("".join(json.dumps({"sentence1": f"A cat {i}.", "sentence2": f"A dog {i}.",
                                        "score": i}) + "\n" for i in range(pairs)))
    return path


def test_the_release_preset_trains_with_the_release_prompt_everywhere(tmp_path, monkeypatch):
    """Main and side rollouts, the STS check and load_models' template check all get the prompt;
    the prompts built contain it; grace.json (what evaluate.py embeds with) and config.json too."""
    prompts, sampled = watch_prompts(monkeypatch)
    out = tmp_path / "o"
    train.main([*FAST, "--preset", "release", "--steps", "1", "--out", str(out), "--eval-every",
                "1", "--eval-data", str(sts_file(tmp_path / "sts.jsonl"))])
    assert len(prompts) >= 4 and set(prompts) == {RELEASE_TEXT}  # check, main, side, STS
    tok = policy.load("tiny")[1]
    assert len(sampled) >= 3  # main, side, STS
    assert all(RELEASE_TEXT in tok.decode(ids) for ids in sampled)
    for folder in ("step-1", "final"):
        assert json.loads((out / folder / "grace.json").read_text())["system_prompt"] == \
            RELEASE_TEXT
    assert json.loads((out / "config.json").read_text())["system_prompt"] == RELEASE_TEXT


def test_a_system_prompt_file_trains_and_is_saved(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("Explain the text in one line.\n", encoding="utf-8")
    prompts, _ = watch_prompts(monkeypatch)
    train.main([*FAST, "--steps", "1", "--system-prompt-file", str(tmp_path / "p.txt"),
                "--out", str(tmp_path / "o")])
    assert set(prompts) == {"Explain the text in one line."}
    info = json.loads((tmp_path / "o" / "final" / "grace.json").read_text())
    assert info["system_prompt"] == "Explain the text in one line."
    assert "system_prompt_file" not in json.loads((tmp_path / "o" / "config.json").read_text())


@pytest.mark.parametrize("content", [None, "\n"])
def test_a_missing_or_empty_system_prompt_file_stops_before_anything_is_written(
        tmp_path, capsys, content):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        train.main([*FAST, "--system-prompt-file", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(path) in err, err
    assert not (tmp_path / "o").exists()


def test_an_old_checkpoint_without_a_saved_prompt_resumes_with_policys_default(
        tmp_path, monkeypatch, capsys):
    """A run saved before --system-prompt existed was trained with policy.DEFAULT_SYSTEM_PROMPT:
    it resumes with it, even under a preset whose default is another; changing it is refused
    unless --force-resume."""
    out = tmp_path / "run"
    train.main([*FAST, "--preset", "release", "--steps", "1", "--out", str(out)])
    state_file = out / "step-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["args"]["system_prompt"]  # as saved before the flag existed
    torch.save(state, state_file)
    prompts, _ = watch_prompts(monkeypatch)
    train.main(["--resume", "--preset", "release", "--steps", "2", "--out", str(out)])
    assert set(prompts) == {policy.DEFAULT_SYSTEM_PROMPT}
    info = json.loads((out / "step-2" / "grace.json").read_text())
    assert info["system_prompt"] == policy.DEFAULT_SYSTEM_PROMPT and info["preset"] == "release"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", "--steps", "3", "--system-prompt", "Other.", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--system-prompt" in err and "--force-resume" in err, err
    train.main(["--resume", "--steps", "3", "--system-prompt", "Other.", "--force-resume",
                "--out", str(out)])
    assert json.loads((out / "step-3" / "grace.json").read_text())["system_prompt"] == "Other."


# ----------------------------------------------------------------------------- one place per knob

@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_accumulated_micro_batches_equal_one_big_batch_for_every_aggregation(aggregation):
    """The loss takes its normaliser from the whole mini-batch, so accumulation is exact: the
    summed gradients of any micro-batch split equal the gradient of one big batch (KL on)."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    kw = dict(clip_eps=0.2, kl_coef=0.1, kl_type="k3", aggregation=aggregation, max_new_tokens=T)
    whole, _ = train.policy_loss(logp, old, ref, adv, mask, **kw)
    (expected,) = torch.autograd.grad(whole, logp)
    normaliser = train.loss_normaliser(mask, aggregation, T)
    total = sum(train.policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], normaliser=normaliser,
                                  **kw)[0]
                for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
    (got,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, whole, atol=1e-6) and torch.allclose(got, expected, atol=1e-6)
    # the hand formula of each aggregation, for the value
    per_token = torch.maximum(-torch.exp(logp - old) * adv[:, None],
                              -torch.exp(logp - old).clamp(0.8, 1.2) * adv[:, None])
    per_token = torch.where(adv[:, None] < 0, torch.minimum(per_token, -3.0 * adv[:, None]),
                            per_token)
    d = ref - logp
    per_token = (per_token + 0.1 * (torch.exp(d) - d - 1)) * mask
    hand = {"token": per_token.sum() / mask.sum(),
            "sequence": (per_token.sum(1) / mask.sum(1)).mean(),
            "constant": per_token.sum() / (B * T)}[aggregation]
    assert whole.item() == pytest.approx(hand.item(), rel=1e-6)  # policy_loss computes in float32


def test_contrastive_loss_matches_a_float64_recomputation_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
               .requires_grad_() for _ in range(3))
    loss = train.contrastive_loss(q, p, n, 0.1)
    loss.backward()

    def by_hand(q, p, n):
        total = 0
        for b in range(len(q)):
            logits = torch.stack([(q[b] * c).sum() / 0.1 for c in list(p) + list(n)])
            total = total - (logits[b] - torch.logsumexp(logits, 0))
        return total / len(q)

    q64, p64, n64 = (x.detach().double().requires_grad_() for x in (q, p, n))
    ref = by_hand(q64, p64, n64)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, b in ((q, q64), (p, p64), (n, n64)):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_rewards_come_from_one_table_with_one_signature():
    """Every reward takes (query, main, negative, group_size, *, temperature, truncated,
    length_penalty, **options); its options are its other keyword parameters, each set by a flag
    (reward.OPTIONS is gone: the signature is the one list)."""
    import inspect
    from argparse import Namespace

    import reward

    common = {"temperature", "truncated", "length_penalty"}
    values = {"with_scale": True, "clustering_weight": 0.2, "cross_group_weight": 0.2,
              "in_batch_weight": 0.0}
    g = torch.Generator().manual_seed(2)
    q, m, n = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
               for _ in range(3))
    for name, fn in reward.REWARDS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["query", "main", "negative", "group_size"], name
        keyword = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert common <= keyword, name
        opts = {k: values[k] for k in keyword - common}  # a KeyError: an option no flag sets
        flags = Namespace(reward=name, no_scale=False, clustering_weight=0.2,
                          cross_group_weight=0.2, in_batch_weight=0.0)
        assert cli.reward_options(flags) == opts, name  # what train.py passes is what it takes
        for negative in (n, None):
            r, _ = fn(q, m, negative, 4, temperature=0.1, truncated=None, length_penalty=True,
                      **opts)
            assert r.shape == (8,) and torch.isfinite(r).all()
    expected, _ = reward.unsupervised_rewards(q, m, 4, temperature=0.1)
    assert torch.equal(reward.release_rewards(q, m, None, 4, temperature=0.1)[0], expected)
    with pytest.raises(TypeError):  # an option that does not apply is refused
        reward.infonce_rewards(q, m, n, 4, clustering_weight=0.3)


# ----------------------------------------------------------------------- the single embedding path

def test_training_and_evaluation_embed_a_text_identically(tiny):
    """The reward in training, the in-training STS check and evaluate.py all go through
    policy.encode."""
    import evaluate

    model, tok = tiny
    args, _ = cli.train_args(["--max-new-tokens", "8", "--compile", "off"])
    texts = ["A man is playing a guitar.", "Two dogs run on the beach."]
    ours = train.encode(model, tok, texts, args, temperature=0.0).embeddings
    theirs = evaluate.encode_texts(model, tok, texts, max_new_tokens=8, temperature=0.0,
                                   batch_size=8)
    assert torch.allclose(ours, torch.from_numpy(theirs), atol=1e-6)
    # sampled: the same seed gives the same rationales and vectors through both entry points
    a = train.encode(model, tok, texts, args, n=2, temperature=1.0,
                     generator=torch.Generator().manual_seed(5))
    b = policy.encode(model, tok, texts, n=2, max_new_tokens=8, temperature=1.0,
                      max_length=args.max_prompt_tokens,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.rollout.sequences, b.rollout.sequences)
    assert torch.allclose(a.embeddings, b.embeddings)


def test_old_logprobs_from_the_embedding_forward_equal_a_separate_pass(tiny):
    model, tok = tiny
    enc = policy.encode(model, tok, ["One text.", "Another, longer text here."], n=2,
                        max_new_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(0), logprob_temperature=0.7)
    ro = enc.rollout
    separate = policy.token_logprobs(model, ro.sequences, ro.attention_mask, ro.completion_mask,
                                     temperature=0.7)
    assert torch.allclose(enc.logprobs, separate.detach(), atol=1e-6)


@pytest.mark.slow
def test_compiled_rollouts_inside_a_training_step_give_the_plain_tokens(tiny):
    """--compile on (static cache, torch.compile, the full length bucketed inside the step) samples
    the same tokens as the plain path for the same seed: greedy, and sampled where float rounding
    allows. The bucket padding is the step's own: the rollout comes back at the plain width."""
    model, tok = tiny
    texts = ["A cat sleeps.", "The sky over the old harbour is grey today."]
    plain, _ = cli.train_args(["--max-new-tokens", "6", "--compile", "off"])
    fast, _ = cli.train_args(["--max-new-tokens", "6", "--compile", "on"])
    for temperature in (0.0, 1.0):
        a, b = (train.encode(model, tok, texts, args, n=2, temperature=temperature,
                             generator=torch.Generator().manual_seed(3)) for args in (plain, fast))
        for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
            assert getattr(a.rollout, field).shape == getattr(b.rollout, field).shape, field
        # the generated tokens agree (and so, at the same width, the whole rollouts)
        gen_a, gen_b = ([s[m.bool()].tolist() for s, m in zip(r.sequences, r.completion_mask)]
                        for r in (a.rollout, b.rollout))
        assert gen_a == gen_b
        assert torch.equal(a.rollout.sequences, b.rollout.sequences)
        assert torch.allclose(a.embeddings, b.embeddings, atol=1e-4)


# ------------------------------------------------------------------------ resume restores the run

@pytest.mark.slow
def test_resume_without_model_or_data_continues_the_same_run_bit_exactly(tmp_path):
    data_file = tmp_path / "triples.jsonl"
    data_file.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i} text",
                                             "negative": f"n {i}"}) + "\n" for i in range(12)))
    base = [*FAST, "--data", str(data_file), "--seed", "3"]
    train.main([*base, "--steps", "4", "--out", str(tmp_path / "full")])
    train.main([*base, "--steps", "2", "--out", str(tmp_path / "half")])
    train.main(["--resume", "--steps", "4", "--out", str(tmp_path / "half")])  # nothing else given
    a, b = weights(tmp_path / "full" / "step-4"), weights(tmp_path / "half" / "step-4")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_refuses_another_model_unless_forced_and_sets_later_checkpoints_aside(
        tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "4", "--out", str(out)])
    err = one_line_exit(capsys, ["--resume", "--model", "tiny-lm", "--out", str(out)])
    assert "--model tiny -> tiny-lm" in err
    assert "--force-resume" in err
    err = one_line_exit(capsys, ["--resume", "--data", str(tmp_path / "other.jsonl"), "--out",
                                 str(out)])
    assert "--data" in err
    # resuming from an older step moves the later checkpoints aside (never deleted, never picked)
    train.main(["--resume", str(out / "step-2"), "--steps", "3", "--out", str(out)])
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2", "step-3"]
    assert (out / "abandoned" / "step-4" / "model.safetensors").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_keep_last_keeps_exactly_n_and_a_final_export_is_written(tmp_path):
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "5", "--save-every", "1", "--keep-last", "2", "--out", str(out)])
    assert sorted(p.name for p in out.glob("step-*")) == ["step-4", "step-5"]
    assert not (out / "final" / "trainer_state.pt").exists()
    info = json.loads((out / "final" / "grace.json").read_text())
    assert info["max_new_tokens"] == 6 and info["step"] == 5
    a, b = weights(out / "final"), weights(out / "step-5")
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((out / "config.json").read_text())
    assert config["keep_last"] == 2 and config["preset"] == "tiny"
    # a checkpoint is not a sentence-transformers model: loading it so fails with a message, never
    # mis-embeds
    sentence_transformers = pytest.importorskip("sentence_transformers")
    with pytest.raises(ImportError, match="GRACE checkpoint"):
        sentence_transformers.SentenceTransformer(str(out / "final"))
    assert "GraceEncoder" in (out / "final" / "README.md").read_text()


# ----------------------------------------------------------------------------- faults

def test_non_finite_steps_are_skipped_counted_and_stop_the_run_without_saving(
        tmp_path, monkeypatch, capsys):
    real = train.policy_loss
    monkeypatch.setattr(train, "policy_loss",
                        lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.main([*FAST, "--steps", "6", "--save-every", "1", "--out", str(out)])
    assert e.value.code == 1
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    rows = metrics(out)
    # both mini-batch updates of each step were skipped
    assert [r["skipped"] for r in rows] == [2, 2, 2]
    # the steps before the third are saved, the third is not ...
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2"]
    initial = policy.load("tiny")[0].state_dict()
    for step in out.glob("step-*"):  # ... and what was saved holds the untouched initial weights
        sd = weights(step)
        assert all(torch.isfinite(v).all() for v in sd.values())
        assert all(torch.equal(v, initial[k]) for k, v in sd.items())


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path, capsys):
    """flock: a second open of .lock conflicts even in the same process (the lock belongs to the
    open file, not the process), so the run here stands for another process's."""
    from infra import runfolder

    out = tmp_path / "busy"
    with runfolder.lock(out):
        err = one_line_exit(capsys, [*FAST, "--steps", "1", "--out", str(out)])
    assert "in use by another run" in err
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_run_that_crashed_before_its_first_checkpoint_does_not_block_a_fresh_start(
        tmp_path, capsys):
    out = tmp_path / "crashed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.1}\n')
    assert "no checkpoint" in one_line_exit(capsys, ["--resume", "--out", str(out)])
    train.main([*FAST, "--steps", "1", "--out", str(out)])
    assert "moved to" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    abandoned = list(out.glob("abandoned/*/metrics.jsonl"))
    assert abandoned[0].read_text() == '{"step": 1, "reward": 0.1}\n'


@pytest.mark.slow
def test_a_signal_in_the_last_step_finishes_the_run_normally(tmp_path, monkeypatch, capsys):
    import signal

    real, calls = train.rl_step, []

    def step_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # during the last of 2 steps
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "rl_step", step_then_signal)
    train.main([*FAST, "--steps", "2", "--out", str(tmp_path / "o")])  # no SystemExit(130)
    printed = capsys.readouterr()
    assert "done:" in printed.out and "interrupted" not in printed.out + printed.err
    assert (tmp_path / "o" / "step-2").exists() and (tmp_path / "o" / "final").exists()


def test_contrastive_objective_trains_checkpoints_and_resumes_exactly(tmp_path):
    base = [*FAST, "--objective", "contrastive", "--kl-coef", "0"]
    train.main([*base, "--steps", "2", "--out", str(tmp_path / "full")])
    rows = metrics(tmp_path / "full")
    assert {"loss", "accuracy", "rationale_len", "empty_frac", "cos_between_texts"} <= set(rows[0])
    train.main([*base, "--steps", "1", "--out", str(tmp_path / "half")])
    train.main(["--resume", "--steps", "2", "--out", str(tmp_path / "half")])
    a, b = weights(tmp_path / "full" / "step-2"), weights(tmp_path / "half" / "step-2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # it did move
    assert any(not torch.equal(a[k], policy.load("tiny")[0].state_dict()[k]) for k in a)


def test_contrastive_ppo_epochs_are_optimizer_steps_per_batch(tmp_path):
    """--objective contrastive --ppo-epochs K: K AdamW steps on each batch (its own steps per
    batch, for a tuned baseline), counted by AdamW itself."""
    train.main([*FAST, "--objective", "contrastive", "--kl-coef", "0", "--ppo-epochs", "3",
                "--steps", "1", "--out", str(tmp_path / "o")])
    opt = torch.load(tmp_path / "o" / "step-1" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert {float(v["step"]) for v in opt["state"].values()} == {3.0}


@pytest.mark.slow
def test_out_naming_a_file_is_one_line(tmp_path):
    """The refusals' real path, `python train.py` (the others run train.main in-process): exit 2,
    one error line, no traceback."""
    (tmp_path / "a_file").write_text("x")
    res = run_cli(*FAST, "--steps", "1", "--out", str(tmp_path / "a_file"))
    assert res.returncode == 2 and "is a file" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --out "), res.stderr
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.slow
@pytest.mark.parametrize("after", [0.3, 2.0, 4.0])
def test_ctrl_c_at_any_moment_of_start_up_exits_quietly(tmp_path, after):
    """Imports, loading, the first steps: wherever Ctrl-C lands, exit 130 and no traceback."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST,
                             "--out", str(tmp_path / "o")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 0: it had already finished
    assert proc.returncode in (0, 130) and "Traceback" not in err, err[-2000:]


# ------------------------------------------------------------------ the run folder across runs

def records_file(path, n):
    path.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i} text",
                                        "negative": f"n {i}"}) + "\n" for i in range(n)))
    return path


def one_line_exit(capsys, argv, code=2):
    """train.main(argv) must exit `code` with one line on stderr -> that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1, err
    return err


def test_a_fresh_start_never_replaces_a_final_it_moves_it_aside(tmp_path, capsys):
    """Delete out/step-*, keep out/final/, rerun: the old model is kept in abandoned/ (and said
    so), not replaced by the new run's."""
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "2", "--out", str(out)])
    old = weights(out / "final")
    for step in out.glob("step-*"):
        shutil.rmtree(step)
    capsys.readouterr()
    train.main([*FAST, "--steps", "2", "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    (aside,) = out.glob("abandoned/*/final")
    assert "no step-N checkpoint left to resume; its final/ (the model)" in printed
    assert str(aside.parent) in printed
    kept, new = weights(aside), weights(out / "final")
    assert all(torch.equal(kept[k], old[k]) for k in old)
    assert any(not torch.equal(new[k], old[k]) for k in old)  # the new run's own export


def test_a_stopped_resume_leaves_the_old_final_marked_stale(tmp_path, monkeypatch, capsys):
    """final/ (step 2), resumed to 6, SIGTERM during step 4: step-4 is saved and final/grace.json
    says "stale": true, "superseded_by_step": 4; the run finished later exports a fresh one."""
    import signal

    out = tmp_path / "run"
    train.main([*FAST, "--steps", "2", "--out", str(out)])
    real, calls = train.rl_step, []

    def step_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # step 4
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "rl_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", "--steps", "6", "--save-every", "5", "--out", str(out)])
    assert e.value.code == 130 and (out / "step-4").exists()
    assert "final/ (step 2) is now stale" in capsys.readouterr().out
    info = json.loads((out / "final" / "grace.json").read_text())
    assert (info["step"], info["stale"], info["superseded_by_step"]) == (2, True, 4)
    monkeypatch.setattr(train, "rl_step", real)
    train.main(["--resume", "--steps", "6", "--out", str(out)])
    info = json.loads((out / "final" / "grace.json").read_text())
    assert info["step"] == 6 and "stale" not in info


def test_keep_last_drops_the_optimizer_state_of_abandoned_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "4", "--out", str(out)])
    before = weights(out / "step-4")
    train.main(["--resume", str(out / "step-2"), "--steps", "3", "--out", str(out)])
    assert "step-4 keeps its weights, its optimizer state was dropped" in capsys.readouterr().out
    state = torch.load(out / "abandoned" / "step-4" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"] is None and state["step"] == 4
    after = weights(out / "abandoned" / "step-4")
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert adam_steps(out / "step-3") == {6}  # the kept checkpoints keep theirs
    err = one_line_exit(capsys, ["--resume", str(out / "abandoned" / "step-4"), "--out",
                                 str(out)])
    assert "holds no optimizer state" in err


def test_epochs_sets_the_length_in_every_preset_and_on_resume(tmp_path, capsys):
    for preset in cli.PRESETS:
        args, _ = cli.train_args(["--preset", preset, "--epochs", "3"])
        assert args.steps is None and args.epochs == 3, preset  # train.prepare counts them
    out, data_file = tmp_path / "run", records_file(tmp_path / "d.jsonl", 8)
    train.main([*FAST, "--epochs", "1", "--data", str(data_file), "--out", str(out)])
    assert [r["step"] for r in metrics(out)] == [1, 2]  # 8 records / 4: not the preset's 20
    train.main(["--resume", "--epochs", "2", "--out", str(out)])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert "--epochs 1 -> 2" in capsys.readouterr().out
    err = one_line_exit(capsys, [*FAST, "--steps", "3", "--epochs", "1", "--out",
                                 str(tmp_path / "both")])
    assert "--steps and --epochs both set the run's length" in err


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run (step-2, step-4, final), to copy and break."""
    out = tmp_path_factory.mktemp("four") / "run"
    train.main([*FAST, "--steps", "4", "--out", str(out)])
    return out


def break_checkpoint(folder, how):
    if how in ("config.json", "tokenizer.json"):
        (folder / how).write_text("{garbage")
    elif how == "shape":  # weights of another model: config.json says twice the width
        config = json.loads((folder / "config.json").read_text())
        config.update(hidden_size=2 * config["hidden_size"])
        (folder / "config.json").write_text(json.dumps(config))
    else:  # a trainer state cut down to a dict without its RNG states
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        del state["rng"]
        torch.save(state, folder / "trainer_state.pt")


@pytest.mark.parametrize("how,why", [
    ("config.json", "config.json is not valid JSON"),
    ("tokenizer.json", "tokenizer.json is not valid JSON"),
    ("shape", "its weights do not fit its config.json"),
    ("trainer_state", "trainer_state.pt lacks rng"),
])
def test_resume_falls_back_past_a_checkpoint_that_does_not_load(four_steps, tmp_path, capsys,
                                                                how, why):
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    break_checkpoint(out / "step-4", how)
    capsys.readouterr()
    train.main(["--resume", "--steps", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"note: skipping {out / 'step-4'}: {why}" in printed, printed
    assert f"from {out / 'step-2'}" in printed
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]  # 3, 4 redone from step-2


def test_a_changed_reference_model_or_process_count_needs_force_and_is_announced(
        tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train.main([*FAST, "--steps", "2", "--out", str(out)])
    err = one_line_exit(capsys, ["--resume", "--steps", "3", "--model", "tiny-lm", "--out",
                                 str(out)])
    assert "--model tiny -> tiny-lm" in err and "--force-resume" in err
    loads, real_load = [], policy.load
    monkeypatch.setattr(policy, "load", lambda name, **k: loads.append(str(name)) or
                        real_load(name, **k))
    train.main(["--resume", "--steps", "3", "--model", "tiny-lm", "--force-resume", "--out",
                str(out)])
    assert "tiny-lm is the KL reference from here on" in capsys.readouterr().out
    assert loads == [str(out / "step-2"), "tiny-lm"]  # the policy resumed, the reference
    info = json.loads((out / "step-3" / "grace.json").read_text())
    assert (info["base_model"], info["kl_reference"]) == ("tiny", "tiny-lm")  # as it was trained
    # a checkpoint of 2 processes (its RNG states: one per rank) resumed on 1
    state_file = out / "step-3" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    torch.save(dict(state, rng=state["rng"] * 2, world=2), state_file)
    err = one_line_exit(capsys, ["--resume", "--steps", "4", "--out", str(out)])
    assert "the processes 2 -> 1" in err and "--force-resume" in err
    train.main(["--resume", "--steps", "4", "--force-resume", "--out", str(out)])
    assert "was trained on 2 process(es), this run has 1" in capsys.readouterr().out


def test_a_mistyped_model_path_is_reported_before_the_presets_batch_size(tmp_path, capsys):
    err = one_line_exit(capsys, ["--model", str(tmp_path / "no" / "model"), "--out",
                                 str(tmp_path / "o")])
    assert f"--model {tmp_path / 'no' / 'model'}: no such model folder" in err, err
    err = one_line_exit(capsys, ["--preset", "release", "--out", str(tmp_path / "o")])
    assert "--batch-size 64 (from the release preset) is more than the 40 records" in err
    assert not (tmp_path / "o").exists()


def test_in_training_sts_reaches_the_console_and_metrics_x100(tmp_path, capsys, monkeypatch):
    """--eval-every: a line and the bar's postfix at each evaluation, metrics.jsonl's "sts_dev",
    all x100: 100 x the Spearman of the step's model, recomputed with evaluate.py and scipy."""
    import evaluate
    from scipy.stats import spearmanr

    out, sts = tmp_path / "run", sts_file(tmp_path / "sts.jsonl", pairs=6)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar is drawn
    train.main([*FAST, "--steps", "2", "--eval-every", "2", "--eval-data", str(sts), "--out",
                str(out)])
    captured = capsys.readouterr()
    row = metrics(out)[1]
    assert "sts_dev_spearman" not in row
    model, tok = policy.load(str(out / "step-2"))
    pairs = [json.loads(line) for line in sts.read_text().splitlines()]
    e = evaluate.encode_texts(model, tok, [p["sentence1"] for p in pairs] +
                              [p["sentence2"] for p in pairs], max_new_tokens=6,
                              temperature=0.0, batch_size=8)
    cos = (e[:6] * e[6:]).sum(-1)
    assert row["sts_dev"] == pytest.approx(100 * spearmanr(cos, [p["score"] for p in pairs])[0],
                                           abs=1e-6)
    assert f"[step 2] STS Spearman x100 on sts.jsonl: {row['sts_dev']:.1f}" in captured.out
    assert f"sts={row['sts_dev']:.3g}" in captured.err  # the bar's postfix


def test_without_a_terminal_a_plain_progress_line_replaces_the_bar(tmp_path, capsys,
                                                                   monkeypatch):
    import re

    from infra import console

    monkeypatch.setattr(console, "HEARTBEAT_SECONDS", 0)  # a line at every step (else every 30 s)
    train.main([*FAST, "--steps", "3", "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("   train: ")]
    assert len(lines) == 3, captured.out
    for n, line in enumerate(lines, 1):
        assert re.fullmatch(rf"   train: {n}/3 steps, \S+ steps/s, about \d+s left "
                            r"\(reward \S+, kl \S+, .*tokens_per_s \S+.*\)", line), line
    assert "it/s" not in captured.err  # no bar


def test_report_to_tensorboard_without_it_is_one_line(tmp_path, capsys, monkeypatch):
    for module in ("tensorboard", "torch.utils.tensorboard"):  # not installed
        monkeypatch.setitem(sys.modules, module, None)
    err = one_line_exit(capsys, [*FAST, "--steps", "1", "--report-to", "tensorboard", "--out",
                                 str(tmp_path / "none")])
    assert "--report-to tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not (tmp_path / "none").exists()


def test_report_to_tensorboard_writes_every_metric(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional extra (pip install tensorboard) is "
                        "not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main([*FAST, "--steps", "2", "--report-to", "tensorboard", "--out", str(out)])
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    rows = metrics(out)
    assert set(board.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for key in rows[0].keys() - {"step"}:
        got = [(e.step, e.value) for e in board.Scalars(key)]
        want = [(r["step"], r[key]) for r in rows]
        assert [s for s, _ in got] == [1, 2], key
        assert all(v == pytest.approx(w, rel=1e-6, abs=1e-7) if w is not None else math.isnan(v)
                   for (_, v), (_, w) in zip(got, want)), key


def test_config_relaunches_a_run_and_flags_override_it(tmp_path):
    first = tmp_path / "first"
    train.main([*FAST, "--steps", "1", "--lr", "1e-4", "--seed", "3", "--group-size", "3",
                "--out", str(first)])
    saved = json.loads((first / "config.json").read_text())
    train.main(["--config", str(first / "config.json"), "--out", str(tmp_path / "again")])
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == saved
    a, b = weights(first / "step-1"), weights(tmp_path / "again" / "step-1")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, bit for bit
    train.main(["--config", str(first / "config.json"), "--lr", "5e-5", "--out",
                str(tmp_path / "other")])
    assert json.loads((tmp_path / "other" / "config.json").read_text()) == dict(saved, lr=5e-5)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"lrr": 0.1}', "unknown key 'lrr' (did you mean 'lr'?)"),
    ('{"lr": "fast"}', "key 'lr': expected a number, got \"fast\""),
    ('{"lr": 5}', "key 'lr': must be in [0, 1], got 5"),
    ('{"reward": "best"}', "key 'reward': 'best' is not one of"),
    ('[1, 2]', "not a JSON object of settings"),
])
def test_a_bad_config_file_is_one_line_naming_it_and_the_key(tmp_path, capsys, content,
                                                              message):
    path = tmp_path / "config.json"
    path.write_text(content)
    err = one_line_exit(capsys, ["--config", str(path), "--out", str(tmp_path / "o")])
    assert f"--config {path}: {message}" in err, err
    assert not (tmp_path / "o").exists()
