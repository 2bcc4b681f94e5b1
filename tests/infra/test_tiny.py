"""infra/tiny.py and the shipped models/tiny/: the folder is what the in-process builder makes, and loads to it."""
import ast
import json

import pytest
import torch

import policy
from helpers import ROOT
from infra import tiny

SHIPPED = ROOT / "models" / "tiny"
TEXTS = ["A man is playing a guitar.", "Hello, world!", "  two  spaces\tand a tab\nnew line", "café naïve façade",
         "日本語のテキスト", "emoji 🙂 and math ∑ x²", "<think>\nsome note\n</think>\nrestated", ""]


@pytest.fixture(scope="module")
def built():
    """The tokenizer as infra.tiny trains it in process (the reference the folder must match)."""
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED, padding_side="left")


def seeded_model(config, seed):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_shipped_folder_is_a_fresh_write(tmp_path):
    fresh = tiny.write(tmp_path / "tiny")
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert not [p for p in SHIPPED.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]  # no weights
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        a, b = (json.loads((d / name).read_text(encoding="utf-8")) for d in (SHIPPED, fresh))
        a.pop("transformers_version", None), b.pop("transformers_version", None)
        assert a == b, f"models/tiny/{name} differs from a fresh build: rebuild it with `python -m infra.tiny`"
    for name in ("chat_template.jinja", "README.md"):
        assert (SHIPPED / name).read_text(encoding="utf-8") == (fresh / name).read_text(encoding="utf-8"), name
    assert "python -m infra.tiny" in (SHIPPED / "README.md").read_text(encoding="utf-8")


def test_shipped_tokenizer_gives_the_built_ids(built, shipped):
    texts = TEXTS + [policy.render_prompt(built, t) for t in TEXTS]
    chat = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": t}] for t in TEXTS]
    assert [policy.render_prompt(shipped, t) for t in TEXTS] == texts[len(TEXTS):]
    assert shipped(texts, add_special_tokens=False)["input_ids"] == built(texts, add_special_tokens=False)["input_ids"]
    assert ([shipped.apply_chat_template(m, add_generation_prompt=True) for m in chat]
            == [built.apply_chat_template(m, add_generation_prompt=True) for m in chat])
    assert shipped.chat_template == built.chat_template == tiny.TINY_CHAT_TEMPLATE
    assert (shipped.eos_token, shipped.pad_token, shipped.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    assert (shipped.eos_token_id, shipped.pad_token_id, len(shipped)) == (built.eos_token_id, built.pad_token_id, 1024)


def test_a_model_from_the_folder_config_is_the_built_one(built):
    from transformers import AutoConfig, GenerationConfig

    folder_config, built_config = AutoConfig.from_pretrained(SHIPPED), tiny.config(built)
    models = {seed: seeded_model(folder_config, seed) for seed in (0, 1)}
    for seed, model in models.items():
        assert same_parameters(model, seeded_model(built_config, seed)), seed
    assert not same_parameters(models[0], models[1])
    assert 0.2e6 < sum(p.numel() for p in models[0].parameters()) < 0.4e6
    gen = GenerationConfig.from_pretrained(SHIPPED)
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == (built.eos_token_id, built.pad_token_id, None)


def test_policy_load_tiny_is_the_seeded_built_model(built):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for seed in (0, 1):
        model, tokenizer = policy.load("tiny", seed=seed)
        assert same_parameters(model, seeded_model(tiny.config(built), seed)), seed
        assert not model.training and next(model.parameters()).dtype == torch.float32
        assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
        assert tokenizer(TEXTS)["input_ids"] == built(TEXTS)["input_ids"] and tokenizer.padding_side == "left"
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched


def test_builder_imports_nothing_of_the_project():
    tree = ast.parse((ROOT / "infra" / "tiny.py").read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"policy", "rollout", "reward", "train", "evaluate", "infra", "tools"}, names
