"""Shared fixtures: tiny random models, built offline in milliseconds.

`tiny` is the project's built-in default (policy.load("tiny")); the `*_model` fixtures are bare
random models of other architectures, built from configs, so code is checked beyond Qwen2.
"""
import os

# Never wait on the hub in tests: a stray download fails at once instead of after a time-out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One CPU thread (subprocesses included): the models here are tiny, and on a busy 2-core machine
# torch's default thread count made single tests 10-20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import NEW_EVAL, make_arch_model, shared_data  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="module")
def encoder(tiny):
    """A GraceEncoder of the tiny default, NEW_EVAL rationale tokens, batch 8 (one per module)."""
    import evaluate

    model, tokenizer = tiny
    return evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, max_new_tokens=NEW_EVAL,
                                 batch_size=8)


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    """The first 24 lines of STS Benchmark dev, as a local file (skips without the shared data)."""
    rows = shared_data("stsbenchmark", "dev.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    path = tmp_path_factory.mktemp("sts") / "sts_dev.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
