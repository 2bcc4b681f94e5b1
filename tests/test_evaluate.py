"""evaluate.py: mteb tasks from local files scored end to end, batch-independent embeddings, the CLI.

Offline with the tiny model and small slices of ../shared/data (written to a temporary folder).
"""
import csv
import time
import json
import math

import mteb
import numpy as np
import pytest
import torch
from conftest import shared_data

import checkpoint
import evaluate
import policy

NEW = 8  # rationale tokens: enough to exercise the rollout, short enough to keep the file fast


@pytest.fixture(scope="module")
def encoder(tiny):
    model, tokenizer = tiny
    return evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, max_new_tokens=NEW, batch_size=8)


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    rows = shared_data("stsbenchmark", "dev.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    path = tmp_path_factory.mktemp("sts") / "sts_dev.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scifact_dir(tmp_path_factory):
    """5 train queries, every document they judge, and 15 distractors, in BEIR layout."""
    src = shared_data("scifact")
    qrels = [line.split("\t") for line in (src / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(q for q, _, _ in qrels))[:5]
    judged = [(q, d, s) for q, d, s in qrels if q in qids]
    keep = {d for _, d, _ in judged}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    docs = [r for r in corpus if r["_id"] in keep] + [r for r in corpus if r["_id"] not in keep][:15]
    queries = [json.loads(line) for line in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    out = tmp_path_factory.mktemp("beir") / "scifact_slice"
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs), encoding="utf-8")
    (out / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    lines = ["query-id\tcorpus-id\tscore"] + ["\t".join(r) for r in judged]
    (out / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def banking_dir(tmp_path_factory):
    """4 intents: 8 train and 3 test texts each, as train.csv / test.csv (text, category)."""
    src = shared_data("banking77")
    out = tmp_path_factory.mktemp("banking77") / "banking_slice"
    out.mkdir()
    for split, per_label in (("train", 8), ("test", 3)):
        rows = list(csv.DictReader(open(src / f"{split}.csv", encoding="utf-8")))
        labels = list(dict.fromkeys(r["category"] for r in rows))[:4]
        picked = [r for label in labels for r in [r for r in rows if r["category"] == label][:per_label]]
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(picked)
    return out


def _score(encoder, task):
    result = mteb.evaluate(encoder, task, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 8})
    return result.task_results[0].get_score()


# ----------------------------------------------------------------------------- mteb end to end

def test_encoder_satisfies_mteb_protocol(encoder):
    from mteb.models.models_protocols import EncoderProtocol
    from mteb.models.model_meta import ScoringFunction

    assert isinstance(encoder, EncoderProtocol)
    meta = encoder.mteb_model_meta
    assert meta.name == "grace/tiny" and meta.revision == "tiny-seed0"
    assert meta.similarity_fn_name is ScoringFunction.COSINE
    baseline = evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer, rationale=False)
    assert baseline.mteb_model_meta.experiment_name != meta.experiment_name  # filed apart in the cache
    # so are runs with another system prompt or prompt length; a default run keeps its name
    same = lambda **kw: evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,  # noqa: E731
                                              max_new_tokens=NEW, batch_size=8, **kw).mteb_model_meta.experiment_name
    names = [same(), same(system_prompt="Describe the text."), same(max_length=256)]
    assert names[0] == meta.experiment_name and len(set(names)) == 3


def test_sts_local_task(encoder, sts_file):
    task = evaluate.local_task(sts_file)
    assert task.metadata.type == "STS"
    assert math.isfinite(_score(encoder, task))


def test_retrieval_local_task(encoder, scifact_dir):
    task = evaluate.local_task(scifact_dir)
    assert task.metadata.type == "Retrieval" and task.metadata.eval_splits == ["train"]
    assert 0.0 <= _score(encoder, task) <= 1.0


def test_classification_local_task(encoder, banking_dir):
    task = evaluate.local_task(banking_dir)
    assert task.metadata.type == "Classification"
    assert 0.0 <= _score(encoder, task) <= 1.0


def test_single_classification_file_is_split_into_train_and_test(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(20)))
    task = evaluate.local_task(path)
    task.load_data()
    assert task.metadata.type == "Classification"
    assert len(task.dataset["train"]) == 16 and len(task.dataset["test"]) == 4
    assert set(task.dataset["test"]["label"]) == {0, 1}


# ----------------------------------------------------------------------------- encoding

TEXTS = ["A man is playing a guitar.", "Short.", "The quick brown fox jumps over the lazy dog near the river bank.",
         "A woman slices an onion.", "Two dogs run across a field of tall grass while a child watches."]


def test_embeddings_do_not_depend_on_batch_composition(tiny):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=NEW)
    alone = np.concatenate([evaluate.encode_texts(model, tokenizer, [t], **kw) for t in TEXTS])
    sorted_batches = evaluate.encode_texts(model, tokenizer, TEXTS, batch_size=2, **kw)
    one_batch = evaluate.encode_texts(model, tokenizer, TEXTS, batch_size=8, sort=False, **kw)
    assert alone.dtype == np.float32 and alone.shape == (len(TEXTS), model.config.hidden_size)
    np.testing.assert_allclose(sorted_batches, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one_batch, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)


def test_rationale_modes_differ_and_no_rationale_pools_the_prompt(tiny):
    model, tokenizer = tiny
    with_r, rationales = evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW, return_rationales=True)
    without = evaluate.encode_texts(model, tokenizer, TEXTS, rationale=False)
    assert all(rationales) and not np.allclose(with_r, without, atol=1e-3)
    ids, mask, start = policy.build_prompts(tokenizer, TEXTS)
    direct = policy.embed(model, ids, mask, policy.pool_mask_from(mask, start)).numpy()
    np.testing.assert_allclose(without, direct, atol=1e-5, rtol=0)


def test_task_instruction_goes_to_the_system_prompt_by_prompt_type(tiny):
    from mteb.types import PromptType

    model, tokenizer = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, instructions=True)
    meta = mteb.get_task("SciFact").metadata  # metadata only: nothing is downloaded
    assert meta.prompt["query"] in enc.system_prompt_for(meta, PromptType.query)
    assert enc.system_prompt_for(meta, PromptType.document) == policy.DEFAULT_SYSTEM_PROMPT


# ----------------------------------------------------------------------------- CLI

def test_cli_summary_table_with_baseline_and_result_files(sts_file, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--local", str(sts_file), "--baseline", "tiny", "--max-new-tokens", str(NEW), "--out", str(out)]
    rc = evaluate.main(argv)
    text = capsys.readouterr().out
    assert rc == 0
    assert "LocalSTS_sts_dev" in text and "average STS (1)" in text and "diff" in text and "+0.00" in text
    assert "rationale tokens (mean)" in text and "empty rationales (%)" in text
    assert f"rationale <= {NEW} tokens (given)" in text and "system prompt (default)" in text
    # mteb's own layout, directly under --out (mteb alone would add a results/ level), and the path printed
    files = list(out.glob("grace__tiny/tiny-seed0/experiments/*/LocalSTS_sts_dev.json"))
    assert len(files) == 1 and f"results in {files[0].parent}" in text
    assert evaluate.main(argv) == 0  # a rerun reuses both results
    text = capsys.readouterr().out
    assert text.count("(cached)") == 2 and "rationale tokens (mean)" not in text
    assert evaluate.main(argv + ["--recompute"]) == 0
    assert "(cached)" not in capsys.readouterr().out


def test_cli_explain_with_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A man plays a guitar.\nA cat sleeps on the sofa.\n\nStocks fell sharply today.\n")
    rc = evaluate.main(["--explain", "Someone is playing music.", "--corpus", str(corpus),
                        "--max-new-tokens", str(NEW), "--top-k", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "=== text: Someone is playing music." in text and text.count("rationale:") == 3  # text + 2 neighbours


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b"}\n')
    return path


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "STSBenchmrk"], "unknown task 'STSBenchmrk'; close matches: STSBenchmark,"),
    (["--benchmark", "MTEB(eng, v9)"], "unknown benchmark 'MTEB(eng, v9)'; close matches: MTEB(eng, v"),
    (["--local", "{tmp}/bad.jsonl"], "bad.jsonl:2: field 'score' is missing"),
    (["--local", "{tmp}/missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["--local", "{tmp}/broken.jsonl"], "broken.jsonl:1:"),
    (["--explain", "hi", "--corpus", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--local", "{tmp}/bad.jsonl", "--model", "{tmp}/no_such_model"], "model folder not found"),
    (["--tasks", "STSBenchmark"], "could not be downloaded"),  # offline (conftest): the hub task has no data
    (["--explain", "hi", "--corpus", "{tmp}/empty.txt"], "empty.txt: no texts"),
    (["--perplexity", "{tmp}/empty.txt"], "empty.txt: no texts"),
    (["--explain", "hi", "--max-length", "5"], "--max-length 5: max_length=5 is too short for the prompt template"),
])
def test_cli_bad_input_one_line_nonzero(argv, message, tmp_path, capsys):
    _bad_jsonl(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"sentence1": "a",\n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    rc = evaluate.main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--max-new-tokens", "2",
                                                                            "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # anything before it is mteb's logging, not ours
    assert rc != 0 and "Traceback" not in err
    assert last.startswith("error: ") and message in last and err.count("error: ") == 1
    if "download" in message:
        assert "--local" in last


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-new-tokens=-1"], "--max-new-tokens must be at least 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_cli_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", str(10 ** 8)], "--max-new-tokens must be at most 131072"),
    (["--batch-size", str(10 ** 21)], "--batch-size must be at most 65536"),
    (["--seed", str(10 ** 21)], "--seed must be at most"),
    (["--temperature", "nan"], "--temperature must be at least 0, got nan"),
    (["--limit", "0", "--local", "x"], "--limit must be at least 1"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "foo:0"], "--device"),
    (["--explain", "hi", "--tasks", "STS12"], "--explain prints rationales only"),
    (["--explain", "hi", "--local", "x.jsonl"], "--explain prints rationales only"),
    (["--explain", "hi", "--benchmark", "MTEB(eng, v1)"], "--explain prints rationales only"),
    (["--corpus", "c.txt", "--tasks", "STS12"], "--corpus is searched with --explain"),
    (["--limit", "5", "--tasks", "STS12"], "--limit cuts --local tasks only"),
    (["--explain", "   "], "--explain: a text is empty or whitespace only"),
    (["--max-new-tokens", "many"], "invalid int value: 'many'"),
])
def test_cli_bad_flags_one_line_exit_2(argv, message, capsys):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _faulty(tmp_path, case):
    """A local task file or folder with one fault; -> its path."""
    sts = lambda score: {"sentence1": "a cat", "sentence2": "a dog", "score": score}  # noqa: E731
    if case.startswith("sts"):
        bad = {"sts_nan": "NaN", "sts_inf": "Infinity", "sts_bool": "true"}.get(case)
        rows = [sts(1.0), '{"sentence1": "x", "sentence2": "y", "score": %s}' % bad] if bad else \
            [sts(2.0), sts(2.0), sts(2.0)] if case == "sts_constant" else [sts(1.0)]
        return _write(tmp_path / f"{case}.jsonl", rows)
    if case.startswith("cls"):
        rows = {"cls_one_class": [{"text": f"t{i}", "label": "a"} for i in range(6)],
                "cls_singleton": [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)] + [{"text": "z", "label": "c"}],
                "cls_blank": [{"text": "t1", "label": "a"}, {"text": "   ", "label": "b"}]}[case]
        return _write(tmp_path / f"{case}.jsonl", rows)
    folder = tmp_path / case
    docs = [{"_id": "d1", "text": "first"}, {"_id": "d2", "text": "second"}]
    if case == "beir_duplicate_id":
        docs.append({"_id": "d1", "text": "again"})
    _write(folder / "corpus.jsonl", docs)
    _write(folder / "queries.jsonl", [{"_id": "q1", "text": "which one"}])
    qrels = {"beir_header_only": ["query-id\tcorpus-id\tscore"],
             "beir_no_relevant": ["query-id\tcorpus-id\tscore", "q1\td1\t0"]}.get(case, ["q1\td1\t1"])
    _write(folder / "qrels" / "test.tsv", qrels)
    return folder


@pytest.mark.parametrize("case, message", [
    ("sts_nan", ":2: field 'score' must be finite"),
    ("sts_inf", ":2: field 'score' must be finite"),
    ("sts_bool", ":2: field 'score' must be a number"),
    ("sts_constant", "Spearman's correlation is undefined for a constant"),
    ("sts_one_row", "needs at least 2 pairs, found 1"),
    ("cls_one_class", "needs at least 2 labels, found 1"),
    ("cls_singleton", ":7: label 'c' has a single row"),
    ("cls_blank", ":2: field 'text' is only whitespace"),
    ("beir_duplicate_id", "corpus.jsonl:3: duplicate _id 'd1' (also on line 1)"),
    ("beir_header_only", "test.tsv: only a header line, no judgements"),
    ("beir_no_relevant", "test.tsv: no relevant document"),
])
def test_degenerate_local_tasks_one_line_exit_2(case, message, tmp_path, capsys):
    path = _faulty(tmp_path, case)
    assert evaluate.main(["--local", str(path), "--out", ""]) == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_classification_train_test_leak_is_dropped_with_a_warning(tmp_path):
    _write(tmp_path / "cls" / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    _write(tmp_path / "cls" / "test.jsonl", [{"text": "t0", "label": "a"}, {"text": "new", "label": "b"}])
    task = evaluate.local_task(tmp_path / "cls")
    with pytest.warns(UserWarning, match="also in train"):
        task.load_data()
    assert task.dataset["test"]["text"] == ["new"]


def test_limit_cuts_local_tasks_and_files_results_apart(sts_file, scifact_dir, banking_dir):
    sts, beir, cls = (evaluate.local_task(p, limit=3) for p in (sts_file, scifact_dir, banking_dir))
    for task in (sts, beir, cls):
        task.load_data()
        assert task.metadata.name.endswith("_first3")
    assert len(sts.dataset["test"]) == 3
    assert len(beir.dataset["default"]["train"]["queries"]) == 3
    assert len(cls.dataset["train"]) == 3 and len(cls.dataset["test"]) == 3


def test_offline_typo_in_hub_model_name_fails_at_once(sts_file, capsys):
    start = time.perf_counter()
    rc = evaluate.main(["--local", str(sts_file), "--baseline", "Qwen/Qwen2.5-1.5B-Instrct", "--out", ""])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: model 'Qwen/Qwen2.5-1.5B-Instrct'") and err.count("\n") == 1
    assert time.perf_counter() - start < 10 and "grace/tiny" not in capsys.readouterr().out  # before any task ran


# ----------------------------------------------------------------------------- one embedding path, the Python API

def test_encode_texts_is_policy_encode(tiny):
    model, tokenizer = tiny
    greedy = policy.encode(model, tokenizer, TEXTS, max_new_tokens=NEW).embeddings.numpy()
    np.testing.assert_allclose(evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW), greedy, atol=1e-5)
    # sampled: the same draws when the batch is the same and the generator has the same seed
    gen = torch.Generator().manual_seed(7)
    sampled = policy.encode(model, tokenizer, TEXTS, max_new_tokens=NEW, temperature=1.0, generator=gen)
    ours, rats = evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW, temperature=1.0, seed=7,
                                       sort=False, batch_size=len(TEXTS), return_rationales=True)
    np.testing.assert_allclose(ours, sampled.embeddings.numpy(), atol=1e-5)
    assert rats == policy.rationale_texts(tokenizer, sampled.rollout)


def test_python_api_is_sentence_transformers_shaped(tiny):
    model, tokenizer = tiny
    enc = evaluate.GraceEncoder("tiny", model=model, tokenizer=tokenizer, max_new_tokens=NEW)
    emb = enc.encode(TEXTS, batch_size=2, show_progress_bar=True, convert_to_tensor=False, normalize_embeddings=True)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(emb, evaluate.encode_texts(model, tokenizer, TEXTS, max_new_tokens=NEW), atol=1e-5)
    tensor = enc.encode(TEXTS[:2], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and torch.allclose(tensor, torch.from_numpy(emb[:2]), atol=1e-5)
    assert enc.encode(TEXTS[0]).shape == (64,)
    assert torch.allclose(enc.similarity(emb[:1], emb[:1]), torch.ones(1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="text 1 is empty or whitespace only"):
        enc.encode(["fine", " \t"])
    # mteb's DataLoader of dict batches gives the same vectors
    loader = [{"text": TEXTS[:3]}, {"text": TEXTS[3:]}]
    np.testing.assert_allclose(enc.encode(loader, task_metadata=None, hf_split="test", hf_subset="default"), emb, atol=1e-5)


def test_checkpoint_grace_json_sets_defaults(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    folder = tmp_path / "step-20"
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    (folder / "grace.json").write_text(json.dumps({"max_new_tokens": 3, "temperature": 1.0, "system_prompt": "Describe.",
                                                   "max_prompt_tokens": 512, "base_model": "tiny", "step": 20}))
    enc = evaluate.GraceEncoder(str(folder))
    assert enc.settings["max_new_tokens"] == 3 and enc.system_prompt == "Describe."
    assert enc.settings["max_length"] == 512 and enc.settings["temperature"] == 0.0  # evaluation stays greedy
    assert "rationale <= 3 tokens (grace.json)" in enc.describe()
    assert evaluate.GraceEncoder(str(folder), max_new_tokens=5).settings["max_new_tokens"] == 5
    assert evaluate.main(["--model", str(folder), "--explain", "A cat."]) == 0
    assert "rationale <= 3 tokens (grace.json)" in capsys.readouterr().out  # printed at start


# ----------------------------------------------------------------------------- checkpoint folders for other tools

def test_sentence_transformers_refuses_a_guarded_checkpoint(tiny, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = policy.load("tiny")
    folder = tmp_path / "step-5"
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    for name, text in checkpoint.st_guard_files().items():
        (folder / name).write_text(text)
    (folder / "README.md").write_text(checkpoint.model_card({"max_new_tokens": 24, "step": 5}))
    with pytest.raises(Exception, match="This is a GRACE checkpoint, not a sentence-transformers model") as e:
        SentenceTransformer(str(folder))
    assert "GraceEncoder" in str(e.value) and "pip install" not in str(e.value)
    # grace itself still loads the folder
    assert evaluate.GraceEncoder(str(folder), max_new_tokens=2).encode(["a text"]).shape == (1, 64)


def test_model_card_says_how_to_embed():
    card = checkpoint.model_card({"max_new_tokens": 24, "base_model": "tiny"})
    assert "GraceEncoder(" in card and "evaluate.py --model" in card and "sentence-transformers" in card
    assert '`max_new_tokens`: 24' in card


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_matches_a_float64_hand_computation(tiny):
    import copy

    model, tokenizer = tiny
    texts = ["A man is playing a guitar.", "Short.", "Two dogs run across a field of tall grass."]
    ours = evaluate.perplexity(model, tokenizer, texts, batch_size=2)  # batched, left-padded
    ref = copy.deepcopy(model).double()
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        logp = ref(input_ids=ids).logits[0, :-1].log_softmax(-1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_cli_perplexity(tmp_path, capsys):
    path = tmp_path / "held_out.txt"
    path.write_text("A man plays a guitar.\n\nA cat sleeps on the sofa.\n")
    assert evaluate.main(["--perplexity", str(path), "--baseline", "tiny", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert out.count("perplexity on 2 texts") == 2


def test_help_is_fast_and_shows_defaults():
    import subprocess
    import sys

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-X", "importtime", str(evaluate.__file__), "-h"], capture_output=True, text=True)
    assert run.returncode == 0 and "(default: 16)" in run.stdout and "(default: results)" in run.stdout
    assert "mteb" not in run.stderr and "../shared" not in run.stdout, "-h must not import mteb"
    assert time.perf_counter() - start < 60


def test_the_compiled_sampler_gives_the_plain_embeddings(tiny):
    """--compile on (static cache, torch.compile, prompts padded to a bucket) embeds as the plain path."""
    model, tok = tiny
    texts = ["A cat sleeps on the mat.", "Rain."]
    plain = evaluate.encode_texts(model, tok, texts, max_new_tokens=5, batch_size=2)
    fast = evaluate.encode_texts(model, tok, texts, max_new_tokens=5, batch_size=2, compile=True)
    assert np.allclose(plain, fast, atol=1e-4)
    assert evaluate.GraceEncoder("tiny", model=model, tokenizer=tok, device="cpu").settings["compile"] is False
