"""tools/pretrain.py: the tokenizer, the chat samples, a deterministic (tiny) build, and the shipped models/tiny-lm."""
import json
import subprocess
import sys

import pytest
import torch

import policy
from helpers import ROOT
from infra import tiny
from tools import pretrain

SHIPPED = ROOT / "models" / "tiny-lm"
LINES = [
    "the team is a unit", "how big is that part compared to the whole?", "an entity that has physical existence",
    "a general concept formed by extracting common features from specific examples", "lard was also used",
    "Did you find your glasses?", "a tangible and visible entity", "the American shopkeeper differs from his European",
] * 8
VARIED = ["Hello, world!", "  two  spaces\tand a tab\nnew line", "café naïve façade", "日本語のテキスト",
          "emoji 🙂 and math ∑ x²", "<think>\nsome note\n</think>\nrestated", "numbers 12345 and 3.14"]
TINY_BUILD = ["--steps", "3", "--hidden", "32", "--ffn", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1",
              "--vocab-size", "400", "--batch-size", "4", "--warmup", "1", "--seq-len", "32", "--heldout-lines", "8"]


@pytest.fixture(scope="module")
def tokenizer():
    return pretrain.build_tokenizer(pretrain.tokenizer_corpus(LINES, 24), 400)


@pytest.fixture
def corpus(tmp_path):
    """A fake WordNet folder: the two text files and a licence file, so the build runs without ../shared."""
    d = tmp_path / "wn"
    d.mkdir()
    (d / "wordnet_examples.txt").write_text("\n".join(LINES[:4] + [f"example {i}" for i in range(30)]))
    (d / "wordnet_glosses.txt").write_text("\n".join(LINES[4:8] + [f"gloss number {i}" for i in range(30)]))
    (d / pretrain.LICENSE_FILE).write_text("WordNet 3.0 Copyright 2006 by Princeton University.")
    return d


def test_tokenizer_round_trip_and_reload(tokenizer, tmp_path):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for text in VARIED:  # byte-level: any (NFC) text decodes back exactly
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path, padding_side="left")
    texts = VARIED + [policy.render_prompt(tokenizer, t) for t in VARIED]
    assert loaded(texts, add_special_tokens=False)["input_ids"] == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.chat_template == tiny.TINY_CHAT_TEMPLATE


def test_chat_sample_is_grace_prompt_plus_answer(tokenizer):
    text = "Did you find your glasses?"
    expected_prompt = (f"<|im_start|>system\n{policy.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                       f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert policy.render_prompt(tokenizer, text) == expected_prompt
    sample = pretrain.chat_text(tokenizer, text, restate_words=24)
    answer = "<think>\nfind your glasses\n</think>\nDid you find your glasses?"
    assert sample == expected_prompt + answer + "<|im_end|>\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 3  # system, user and the answer each end with <|im_end|>


def test_assistant_turn_restates_a_bounded_prefix():
    long = " ".join(f"w{i}" for i in range(50))
    assert pretrain.assistant_turn(long, 5).endswith("</think>\nw0 w1 w2 w3 w4")
    assert pretrain.think_note("a big elephant (the grey one)") == "big elephant grey"  # longest, in text order


def test_split_is_seeded_and_disjoint():
    lines = [f"line {i}" for i in range(100)]
    train, held = pretrain.split_lines(lines, 5, seed=0)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == sorted(lines)
    assert pretrain.split_lines(lines, 5, seed=0) == (train, held)
    assert pretrain.split_lines(lines, 5, seed=1)[1] != held


def _build(corpus, out, seed):
    pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(out), "--seed", str(seed)])
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_build_is_deterministic_from_seed(corpus, tmp_path):
    a, b = _build(corpus, tmp_path / "a", 0), _build(corpus, tmp_path / "b", 0)
    c = _build(corpus, tmp_path / "c", 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k in c)
    out = tmp_path / "a"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md", "WORDNET_LICENSE"):
        assert (out / name).exists(), name
    assert "OMP_NUM_THREADS=1 python tools/pretrain.py --steps 3" in (out / "README.md").read_text()  # how to rebuild
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [0, 2] and records[-1]["heldout_ppl"] > 1
    model, tok = policy.load(str(out))  # loads like any model folder, as float32
    assert next(model.parameters()).dtype == torch.float32
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_policy_does_not_import_pretrain():
    import ast

    tree = ast.parse((ROOT / "policy.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"pretrain", "tools", "tools.pretrain"}  # imports flow one way: pretrain -> policy


def test_without_a_data_folder_it_says_what_it_needs_in_one_line(tmp_path, capsys):
    for argv in ([], ["--data-dir", str(tmp_path)]):  # no folder given; a folder without the WordNet files
        with pytest.raises(SystemExit) as e:
            pretrain.main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1
        assert all(name in err for name in (*pretrain.CORPUS_FILES, pretrain.LICENSE_FILE)) and "WordNet" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_runs_as_a_script_from_the_repo_root(tmp_path):
    """`python tools/pretrain.py` finds the project's modules (the repo root is put on sys.path)."""
    done = subprocess.run([sys.executable, "tools/pretrain.py", "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--data-dir" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- safety

@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "1e30"], "--lr must be in [0, 1]"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--log-every", "0"], "--log-every must be in [1,"), (["--steps", "0"], "--steps must be in"),
    (["--hidden", "30", "--heads", "4"], "--hidden 30 must be a multiple of 2 x --heads 4"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
])
def test_a_bad_flag_is_one_line_and_writes_nothing(argv, message, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY_BUILD + argv + ["--data-dir", str(corpus), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wn"]  # no output, no temporary folder


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "wordnet_glosses.txt").write_bytes(b"ok\n\xff bad byte\n"),
     "wordnet_glosses.txt:2: invalid UTF-8"),
    (lambda d: [(d / n).write_text("") for n in pretrain.CORPUS_FILES],  # it used to loop forever
     "0 distinct lines"),
])
def test_an_unusable_corpus_is_one_line(make, message, corpus, tmp_path, capsys):
    make(corpus)
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_the_default_output_is_not_the_shipped_model():
    out = pretrain.ROOT / pretrain.parse_args(["--data-dir", "x"]).out
    assert out.resolve() != SHIPPED.resolve() and not out.resolve().is_relative_to(ROOT / "models")


@pytest.fixture
def earlier_build(tmp_path):
    """An output folder as an earlier build left it: every file's bytes, to compare with."""
    out = tmp_path / "built"
    out.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "metrics.jsonl", "WORDNET_LICENSE"):
        (out / name).write_text(f"old {name}")
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_diverging_loss_stops_in_one_line_and_keeps_the_earlier_build(
        corpus, earlier_build, monkeypatch, capsys):
    out, before = earlier_build
    build_model = pretrain.build_model

    def nan_model(tokenizer, args):  # a weight gone NaN: the loss is NaN from the first step
        model = build_model(tokenizer, args)
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
        return model
    monkeypatch.setattr(pretrain, "build_model", nan_model)
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()  # (above it: the progress bar)
    assert e.value.code == 1 and err[-1].startswith("error: step 0: the loss is nan; nothing saved")
    assert sum("error" in line for line in err) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # metrics.jsonl too
    assert _leftovers(out) == []


def test_a_kill_during_the_save_keeps_the_earlier_build_whole(
        corpus, earlier_build, monkeypatch):
    out, before = earlier_build

    def killed(*a, **kw):  # Ctrl-C after the weights and the tokenizer were written
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "write_card", killed)
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(out)])
    assert e.value.code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new weights, old tokenizer
    assert _leftovers(out) == []


def test_a_build_replaces_an_earlier_one_whole_and_refuses_a_foreign_folder(
        corpus, earlier_build, tmp_path, capsys):
    out, before = earlier_build
    pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(out)])
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "metrics.jsonl", "README.md",
            "WORDNET_LICENSE", "config.json"} <= files and _leftovers(out) == []
    assert all((out / n).read_bytes() != before[n] for n in before)  # every file is the new build
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["final"]
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        pretrain.main(TINY_BUILD + ["--data-dir", str(corpus), "--out", str(foreign)])
    assert e.value.code == 2 and "not a pretrain.py build" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "model.safetensors").exists():
        pytest.skip(f"{SHIPPED} is not built (python tools/pretrain.py)")
    return policy.load(str(SHIPPED))


def test_shipped_model_files(shipped):
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size <= 10 * 2**20, f"models/tiny-lm is {size / 2**20:.1f} MB"
    assert "Princeton University" in (SHIPPED / "WORDNET_LICENSE").read_text()
    final = json.loads((SHIPPED / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["heldout_ppl"] < 500  # trained: a random model scores about the vocab size, 4096
    gen = json.loads((SHIPPED / "generation_config.json").read_text())
    model, tok = shipped
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id


def test_shipped_model_answers_with_eos(shipped):
    import rollout

    model, tok = shipped
    texts = ["A man is playing a guitar.", "the act of moving something from one place to another"]
    ids, mask, _ = policy.build_prompts(tok, texts)
    with torch.no_grad():
        out = rollout.sample(model, ids, mask, 64, temperature=0.0, eos_token_id=policy.stop_token_ids(model, tok),
                             pad_token_id=tok.pad_token_id)
    assert not out.truncated.any()  # every greedy rationale ended with <|im_end|> within 64 tokens
    assert (out.completion_mask.sum(1) >= 4).all()


def test_shipped_model_embeddings_depend_on_the_text(shipped):
    model, tok = shipped
    ids, mask, start = policy.build_prompts(tok, ["a small dog", "the stock market fell sharply today"])
    with torch.no_grad():
        h = policy.mean_pool(policy.hidden_states(model, ids, mask), policy.pool_mask_from(mask, start))
    assert float(h[0] @ h[1]) < 0.99
