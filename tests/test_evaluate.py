"""evaluate.py: mteb tasks from local files scored end to end, batch-independent embeddings, the CLI.

Offline with the tiny model and small slices of ../shared/data (written to a temporary folder).
"""
import csv
import json
import math

import mteb
import numpy as np
import pytest
from conftest import shared_data

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


def test_single_file_classification_split_keeps_every_label_on_both_sides():
    rows = [(f"text {i}", label) for i, label in enumerate("aaaaabbbbbbbbbbccc")] + [("lonely", "d")]
    split = evaluate._split_rows(rows)
    assert sorted(split["train"] + split["test"]) == sorted(rows)
    assert {l for _, l in split["test"]} == {"a", "b", "c"}  # "d" has one row: train only
    assert {l for _, l in split["train"]} == {"a", "b", "c", "d"}


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
    rc = evaluate.main(["--local", str(sts_file), "--baseline", "tiny", "--max-new-tokens", str(NEW),
                        "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "LocalSTS_sts_dev" in text and "average STS (1)" in text and "diff" in text and "+0.00" in text
    assert list(out.rglob("LocalSTS_sts_dev.json"))  # mteb's own result JSON


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
    (["--local", "{tmp}/bad.jsonl"], "bad.jsonl, line 2: missing field 'score'"),
    (["--local", "{tmp}/missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["--local", "{tmp}/broken.jsonl"], "broken.jsonl, line 1: not valid JSON"),
    (["--explain", "hi", "--corpus", "{tmp}/missing.txt"], "missing.txt: cannot read"),
    (["--local", "{tmp}/bad.jsonl", "--model", "{tmp}/no_such_model"], "model folder not found"),
    (["--tasks", "STSBenchmark"], "could not be downloaded"),  # offline (conftest): the hub task has no data
    (["--explain", "hi", "--max-length", "5"], "--max-length 5: max_length=5 is too short for the prompt template"),
])
def test_cli_bad_input_one_line_nonzero(argv, message, tmp_path, capsys):
    _bad_jsonl(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"sentence1": "a",\n')
    rc = evaluate.main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--max-new-tokens", "2"])
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
