"""Test helpers shared by every test module: paths, the shared data, small random models.

Imported as `from helpers import ...` (pyproject.toml puts tests/ on the path); fixtures live in
conftest.py.
"""
import itertools
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

NEW_EVAL = 8  # rationale tokens in evaluation tests: exercise the rollout, stay fast
VOCAB = 128  # small vocabulary for the architecture fixtures
EOS = 2  # eos token id of the architecture fixtures (pad is 0)


def shared_data(*parts):
    """Path into ../shared/data, or skip the test when the folder is absent (a user's fresh clone)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data beside the repo), which is absent")
    return path


def _random_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()  # from_config starts in train mode
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = EOS
    return model


def make_arch_model(arch):
    """A random float32 causal LM of `arch` (qwen2 | llama | gpt2), eval mode, dropout off."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    else:
        cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
        cfg = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **common)
    return _random_model(cfg)


# ----------------------------------------------------------------------------- rollouts

NEW = 10
FIELDS = ("sequences", "attention_mask", "completion_mask", "truncated")


def ragged_prompts(batch=4, length=7, pads=(0, 2, 5, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads[:batch]):
        ids[i, :p], mask[i, :p] = 0, 0
    return ids, mask


def hf_greedy(model, ids, mask, eos, pad=0, new=NEW):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          eos_token_id=eos, pad_token_id=pad)


def first_hit(tokens, eos):
    """(B,) step of each row's first token in `eos` (len(row) if none), of a (B, T) greedy run."""
    hits = torch.isin(tokens, torch.tensor(eos))
    return [int(row.nonzero()[0]) if row.any() else tokens.size(1) for row in hits]


def pick_eos(tokens):
    """EOS ids (one or two tokens the greedy run does emit) that stop rows at different steps and
    leave at least one row running to the end, so stopping and truncation are both exercised."""
    candidates = sorted(set(tokens[:, 1:].flatten().tolist()))
    best, best_score = None, 0
    pairs = (list(p) for p in itertools.combinations(candidates, 2))
    for eos in itertools.chain(([c] for c in candidates), pairs):
        steps = first_hit(tokens, eos)
        if max(steps) < tokens.size(1) or min(steps) == tokens.size(1):
            continue  # need some row never stopping and some row stopping
        score = len(set(steps))
        if score > best_score:
            best, best_score = eos, score
    assert best is not None and best_score >= 2, tokens
    return best


def check_masks(r, prompt_mask, eos):
    """Masks by position: completion_mask covers generated tokens up to and including the first
    EOS."""
    P = prompt_mask.size(1)
    assert r.completion_mask[:, :P].eq(0).all()
    assert torch.equal(r.attention_mask[:, :P], prompt_mask)
    comp = r.sequences[:, P:]
    for i, step in enumerate(first_hit(comp, eos)):
        n = min(step + 1, comp.size(1))  # tokens kept: up to and including EOS
        assert r.completion_mask[i, P:P + n].eq(1).all()
        assert r.completion_mask[i, P + n:].eq(0).all()
        assert torch.equal(r.attention_mask[i, P:], r.completion_mask[i, P:])
        assert bool(r.truncated[i]) == (step == comp.size(1))
