"""lora.py and --lora-rank: the adapter math against float64 by hand, the base model kept bit for
bit (adapters off, frozen weights, the KL reference), merged weights (decode copy, final/), exact
resume, gradient checkpointing and the one-line refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import lora
import policy
import train
from helpers import make_arch_model
from infra import cli, data, fast_decode, runfolder

FAST = ["--batch-size", "4", "--group-size", "2", "--mini-batch-size", "2",
        "--max-new-tokens", "6", "--max-prompt-tokens", "256", "--log-rationales", "0"]
IDS = torch.tensor([[5, 9, 17, 3, 44, 8], [0, 0, 12, 7, 7, 30]])
MASK = (IDS != 0).long()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def randomise_b(model, seed=0):
    """B = 0 at init: give it values so that the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_init_and_disabled_adapters_are_the_base_model_bit_for_bit(arch):
    model = make_arch_model(arch)
    base = logits(model)
    names = lora.add(model, 4)
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down per layer
    assert torch.equal(logits(model), base)  # B = 0: exactly the base model at step 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    randomise_b(model)
    assert not torch.allclose(logits(model), base)
    with lora.disabled(model):
        assert torch.equal(logits(model), base)
    assert not torch.allclose(logits(model), base)  # back on after the block
    plain = make_arch_model(arch)
    with lora.disabled(plain):  # no adapters: a no-op
        assert torch.equal(logits(plain), base)


def test_adapter_forward_is_w_x_plus_scaled_b_a_x_and_merging_gives_the_same_model():
    model = make_arch_model("qwen2").double()
    lora.add(model, 3, alpha=5.0)
    model.double()
    randomise_b(model)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, q.in_features, dtype=torch.float64)
    by_hand = x @ q.weight.T + q.bias + 5.0 / 3 * (x @ q.lora_A.T) @ q.lora_B.T
    assert torch.allclose(q(x), by_hand, atol=1e-12)
    adapted = logits(model)
    lora.merge(model)
    assert lora.layers(model) == {} and not any(".lora_" in k for k in model.state_dict())
    assert torch.allclose(logits(model), adapted, atol=1e-10)


def test_the_decode_copy_holds_the_merged_weights_and_no_adapter():
    model = make_arch_model("qwen2")
    lora.add(model, 4)
    randomise_b(model)
    low, pairs = fast_decode.decode_copy(model)
    assert len(pairs) == len(lora.layers(model))
    for copy_linear, master in pairs:
        assert not copy_linear.lora_on
        assert torch.equal(copy_linear.weight, lora.weight(master))
        assert copy_linear.weight.data_ptr() != master.weight.data_ptr()  # the master's W kept
    assert torch.allclose(logits(low), logits(model), atol=1e-5)


def test_refusals_are_one_line(capsys, tmp_path):
    with pytest.raises(ValueError, match="Conv1D"):
        lora.add(make_arch_model("gpt2"), 4, targets=("c_attn",))
    with pytest.raises(ValueError, match="match no layer"):
        lora.add(make_arch_model("gpt2"), 4)  # the default targets: no such Linear in GPT-2
    for flags, words in ((["--lora-rank", "4", "--fsdp"], "--fsdp"),
                         (["--lora-rank", "4", "--lora-targets", "qproj"], "qproj"),
                         (["--lora-alpha", "4"], "need --lora-rank"),
                         (["--lora-rank", "-1"], "--lora-rank")):
        with pytest.raises(SystemExit) as e:
            train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "x"), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err


def setup(*flags):
    """(args, model, ref, tok, opt, batch) of a tiny run, in process: one optimizer step per batch
    (KL and loss measured at the base model), no length penalty (cut rationales: A = 0)."""
    args, _ = cli.train_args([*FAST, "--mini-batch-size", "4", "--no-length-penalty", *flags])
    model, tok, ref = train.load_models(args)
    records = data.load_records(args.data, args.mode)
    batch = train.next_batch(records, dict(epoch=0, position=0), args, 0, 1)
    return args, model, ref, tok, runfolder.optimizer(model, args), batch


def test_a_lora_step_starts_as_full_finetuning_and_changes_only_the_adapters():
    args, model, ref, tok, opt, batch = setup("--lora-rank", "4")
    assert ref is model  # the reference: the policy, adapters off (no second model loaded)
    adapters = [p for m in lora.layers(model).values() for p in (m.lora_A, m.lora_B)]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in adapters]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got, _ = train.rl_step(model, ref, tok, opt, batch, args, torch.Generator().manual_seed(0), 1)
    fargs, fmodel, fref, ftok, fopt, _ = setup()
    want, _ = train.rl_step(fmodel, fref, ftok, fopt, batch, fargs,
                            torch.Generator().manual_seed(0), 1)
    assert got["kl"] == 0.0 and want["kl"] == 0.0  # the step starts at the base model
    assert got["grad_norm"] > 0 and got["adv_abs"] > 0
    assert got["loss"] == want["loss"] and got["reward"] == want["reward"]
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert all(".lora_" in k for k in changed)  # every base tensor bit-identical
    assert {k for k in changed if ".lora_B" in k} == {k for k in after if ".lora_B" in k}


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    def grads(checkpointing):
        model = make_arch_model("qwen2")
        lora.add(model, 4)
        randomise_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train(checkpointing)
        logp = policy.token_logprobs(model, IDS, MASK, MASK)
        logp.sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]
    plain, ckpt = grads(False), grads(True)
    assert all(g is not None for g in ckpt) and len(ckpt) == len(plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_lora_checkpoints_hold_adapters_resume_exactly_and_export_a_merged_model(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    flags = [*FAST, "--lora-rank", "4", "--save-every", "1", "--no-length-penalty"]  # (A != 0)
    train.main([*flags, "--steps", "2", "--out", str(full)])
    train.main([*flags, "--steps", "1", "--out", str(half)])
    train.main(["--resume", "--steps", "2", "--out", str(half), "--lora-export", "adapters"])
    step = full / "step-2"
    assert not (step / "model.safetensors").exists()  # the base is named, not copied
    info = json.loads((step / "lora.json").read_text())
    assert info == dict(base_model="tiny", rank=4, alpha=8.0, dropout=0.0,
                        targets=list(lora.TARGETS))
    a, b = load_file(step / "adapters.safetensors"), load_file(half / "step-2/adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact resume
    c = load_file(half / "final" / "adapters.safetensors")  # --lora-export adapters
    assert all(torch.equal(a[k], c[k]) for k in a)
    # final/: the merged model, plain weights, embeds as the adapted model does
    args, _ = cli.train_args([])
    adapted, tok = runfolder.load_adapters(step, args)
    merged, _ = policy.load(str(full / "final"))
    assert not any(".lora_" in k for k in merged.state_dict())
    base = policy.load("tiny")[0].state_dict()
    assert any(not torch.equal(base[k], v) for k, v in merged.state_dict().items())
    texts = ["A cat sleeps on the mat.", "Rain falls in autumn."]
    e1 = policy.encode(adapted, tok, texts, max_new_tokens=6).embeddings
    e2 = policy.encode(merged, tok, texts, max_new_tokens=6).embeddings
    assert torch.allclose(e1, e2, atol=1e-4)
    assert json.loads((full / "final" / "grace.json").read_text())["base_model"] == "tiny"


def test_an_adapter_only_final_is_refused_in_one_line_naming_the_merge(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*FAST, "--lora-rank", "4", "--steps", "1", "--lora-export", "adapters",
                "--out", str(out)])
    capsys.readouterr()
    assert evaluate.main(["--model", str(out / "final"), "--explain", "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out / 'final'}: LoRA adapters only (--lora-export adapters); merge "
                   f"them into a model first: python train.py --out {out} --resume --lora-export "
                   "merged")
    train.main(["--out", str(out), "--resume", "--lora-export", "merged"])  # what it says to do
    assert (out / "final" / "model.safetensors").is_file()
    assert evaluate.main(["--model", str(out / "final"), "--explain", "a cat"]) == 0
