"""Shared fixtures: tiny random models, built offline in milliseconds.

`tiny` is the project's built-in default (policy.load("tiny")); the `*_model` fixtures are bare
random models of other architectures, built from configs, so code is checked beyond Qwen2.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

# Never wait on the hub in tests: a stray download fails at once instead of after a time-out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

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


@pytest.fixture(scope="session")
def qwen2_model():
    return make_arch_model("qwen2")


@pytest.fixture(scope="session")
def llama_model():
    return make_arch_model("llama")


@pytest.fixture(scope="session")
def gpt2_model():
    return make_arch_model("gpt2")


@pytest.fixture(params=["qwen2", "llama", "gpt2"])
def arch_model(request):
    """Each architecture in turn (a fresh model per test, so tests may modify it)."""
    return make_arch_model(request.param)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the built-in tiny default."""
    import policy

    return policy.load("tiny")
