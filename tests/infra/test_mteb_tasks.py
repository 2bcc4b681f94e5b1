"""infra/mteb_tasks.py: local files as mteb tasks, task names, the result cache, model ids, and
the summary table.

Offline with the tiny model and small slices of ../shared/data (written to a temporary folder).
"""
import argparse
import csv
import json
import math
import os

import pytest

import evaluate
from helpers import NEW_EVAL as NEW  # rationale tokens of the `encoder` fixture
from helpers import shared_data
from infra import mteb_tasks
from infra.cli import UsageError


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def scifact_dir(tmp_path_factory):
    """5 train queries, every document they judge, and 15 distractors, in BEIR layout."""
    src = shared_data("scifact")
    lines = (src / "qrels" / "train.tsv").read_text().splitlines()[1:]
    qrels = [line.split("\t") for line in lines]
    qids = list(dict.fromkeys(q for q, _, _ in qrels))[:5]
    judged = [(q, d, s) for q, d, s in qrels if q in qids]
    keep = {d for _, d, _ in judged}
    corpus = _jsonl(src / "corpus.jsonl")
    docs = [r for r in corpus if r["_id"] in keep]
    docs += [r for r in corpus if r["_id"] not in keep][:15]
    queries = _jsonl(src / "queries.jsonl")
    out = tmp_path_factory.mktemp("beir") / "scifact_slice"
    (out / "qrels").mkdir(parents=True)
    for name, rows in (("corpus.jsonl", docs), ("queries.jsonl", queries)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
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
        with open(src / f"{split}.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        labels = list(dict.fromkeys(r["category"] for r in rows))[:4]
        picked = [r for label in labels
                  for r in [r for r in rows if r["category"] == label][:per_label]]
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(picked)
    return out


def _score(encoder, task):
    import mteb

    result = mteb.evaluate(encoder, task, cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 8})
    return result.task_results[0].get_score()


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------- local tasks, scored by mteb

@pytest.mark.slow
def test_sts_local_task(encoder, sts_file):
    task = mteb_tasks.local_task(sts_file)
    assert task.metadata.type == "STS"
    assert math.isfinite(_score(encoder, task))


@pytest.mark.slow
def test_retrieval_local_task(encoder, scifact_dir):
    task = mteb_tasks.local_task(scifact_dir)
    assert task.metadata.type == "Retrieval" and task.metadata.eval_splits == ["train"]
    assert 0.0 <= _score(encoder, task) <= 1.0


@pytest.mark.slow
def test_classification_local_task(encoder, banking_dir):
    task = mteb_tasks.local_task(banking_dir)
    assert task.metadata.type == "Classification"
    assert 0.0 <= _score(encoder, task) <= 1.0


# ----------------------------------------------------------------------------- local tasks, loaded

def test_single_classification_file_is_split_into_train_and_test(tmp_path):
    path = _write(tmp_path / "intents.jsonl",
                  [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(20)])
    task = mteb_tasks.local_task(path)
    task.load_data()
    assert task.metadata.type == "Classification"
    assert len(task.dataset["train"]) == 16 and len(task.dataset["test"]) == 4
    assert set(task.dataset["test"]["label"]) == {0, 1}


def test_classification_train_test_leak_is_dropped_with_a_warning(tmp_path):
    _write(tmp_path / "cls" / "train.jsonl",
           [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    _write(tmp_path / "cls" / "test.jsonl",
           [{"text": "t0", "label": "a"}, {"text": "new", "label": "b"}])
    task = mteb_tasks.local_task(tmp_path / "cls")
    with pytest.warns(UserWarning, match="also in train"):
        task.load_data()
    assert task.dataset["test"]["text"] == ["new"]


def test_limit_cuts_local_tasks_and_files_results_apart(sts_file, scifact_dir, banking_dir):
    sts, beir, cls = (mteb_tasks.local_task(p, limit=3)
                      for p in (sts_file, scifact_dir, banking_dir))
    for task in (sts, beir, cls):
        task.load_data()
        assert task.metadata.name.endswith("_first3")
    assert len(sts.dataset["test"]) == 3
    assert len(beir.dataset["default"]["train"]["queries"]) == 3
    assert len(cls.dataset["train"]) == 3 and len(cls.dataset["test"]) == 3


def test_local_task_names_and_refusals(tmp_path):
    sts = _write(tmp_path / "pairs.jsonl", [{"sentence1": "a", "sentence2": "b", "score": s}
                                            for s in (1, 2)])
    assert mteb_tasks.local_task(sts).metadata.name == "LocalSTS_pairs"
    with pytest.raises(UsageError, match="missing.jsonl: no such file or folder"):
        mteb_tasks.local_task(tmp_path / "missing.jsonl")
    other = _write(tmp_path / "other.jsonl", [{"query": "q", "answer": "a"}])
    with pytest.raises(UsageError, match="other.jsonl:1: expected fields .* found answer, query$"):
        mteb_tasks.local_task(other)
    _write(tmp_path / "beir" / "corpus.jsonl", [{"_id": "d1", "text": "a"}])
    with pytest.raises(UsageError, match="qrels: no .tsv judgement files"):
        mteb_tasks.local_task(tmp_path / "beir")


# --------------------------------------------------------------------------- names, ids, the cache

def test_close_matches_of_a_typo():
    """resolve_tasks names them for an unknown task or benchmark (the CLI test: test_evaluate)."""
    names = ["STSBenchmark", "STS12", "SciFact", "Banking77Classification"]
    assert mteb_tasks._closest("STSBenchmrk", names) == "; close matches: STSBenchmark"
    assert mteb_tasks._closest("zzzzzz", names) == ""


def test_local_tasks_are_read_when_resolved(tmp_path):
    """A bad row fails in resolve_tasks, before any model loads."""
    bad = _write(tmp_path / "bad.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1},
                                          {"sentence1": "a", "sentence2": "b"}])
    args = argparse.Namespace(tasks=None, benchmark=None, local=[str(bad)], limit=None)
    with pytest.raises(ValueError, match="bad.jsonl:2: field 'score' is missing"):
        mteb_tasks.resolve_tasks(args)


def test_model_id_is_one_revision_per_checkpoint(tiny, tmp_path):
    model, _ = tiny
    assert mteb_tasks.model_id("tiny", model) == ("grace/tiny", "tiny-seed0")
    name, rev = mteb_tasks.model_id("tiny-lm", model)
    assert name == "grace/tiny-lm" and len(rev) == 12
    folder = tmp_path / "run" / "step-5"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    name, rev = mteb_tasks.model_id(str(folder), model)
    assert name == "run/step-5" and len(rev) == 12
    (folder / "model.safetensors").write_bytes(b"other weights")  # retrained: a new revision
    again = mteb_tasks.model_id(folder, model)
    assert again[0] == "run/step-5" and again[1] != rev
    assert mteb_tasks.model_id(str(folder), model) == again
    assert mteb_tasks.model_id("someone/some-model", model)[0] == "someone/some-model"


def test_result_cache_files_results_in_mtebs_own_layout(encoder, tmp_path):
    cache = mteb_tasks.result_cache(tmp_path / "cache")
    path = cache.get_task_result_path("LocalSTS_x", encoder.mteb_model_meta)
    rel = path.relative_to(tmp_path / "cache")
    assert rel.parts[:4] == ("results", "grace__tiny", "tiny-seed0", "experiments")
    assert rel.name == "LocalSTS_x.json"


def test_checkpoint_settings_and_read_texts(tmp_path):
    assert mteb_tasks.checkpoint_settings(tmp_path) == {}
    assert mteb_tasks.checkpoint_settings("tiny") == {}
    (tmp_path / "grace.json").write_text('{"max_new_tokens": 3}')
    assert mteb_tasks.checkpoint_settings(tmp_path) == {"max_new_tokens": 3}
    (tmp_path / "grace.json").write_text("{cut")
    with pytest.raises(UsageError, match="grace.json: not readable JSON"):
        mteb_tasks.checkpoint_settings(tmp_path)
    (tmp_path / "grace.json").write_text("[1]")
    with pytest.raises(UsageError, match="grace.json: expected a JSON object"):
        mteb_tasks.checkpoint_settings(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n\n two \n")
    assert mteb_tasks.read_texts(texts) == ["one", " two "]
    texts.write_text("\n \n")
    with pytest.raises(UsageError, match="texts.txt: no texts"):
        mteb_tasks.read_texts(texts)


def test_check_model_name_refuses_a_missing_folder_at_once(tmp_path):
    mteb_tasks.check_model_name("tiny")
    mteb_tasks.check_model_name(tmp_path)
    with pytest.raises(UsageError, match="model folder not found: ./no_such_model"):
        mteb_tasks.check_model_name("./no_such_model")
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # conftest: offline, so a hub name fails at once
        with pytest.raises(UsageError, match=r"model 'nobody/no-such-model-xyz': .*\(offline"):
            mteb_tasks.check_model_name("nobody/no-such-model-xyz")


# ----------------------------------------------------------------------------- the summary table

def test_summary_table_scores_averages_diff_and_stats():
    columns = {"grace/a": {"S1": 0.5, "R1": 0.25}, "grace/b": {"S1": 0.25, "R1": 0.25}}
    types = {"S1": "STS", "R1": "Retrieval"}
    stats = {"grace/a": dict(texts=4, tokens=10, empty=1, rationale=True),
             "grace/b": dict(texts=4, tokens=0, empty=4, rationale=False)}
    lines = mteb_tasks.summary_table(columns, types, stats, {"grace/a": 12.5, "grace/b": 3.0})
    lines = lines.splitlines()
    assert lines[0].split() == ["task", "type", "grace/a", "grace/b", "diff"]
    row = {line.split("  ")[0].strip(): line.split() for line in lines if not line.startswith("-")}
    assert row["S1"][-3:] == ["50.00", "25.00", "+25.00"]
    assert row["R1"][-3:] == ["25.00", "25.00", "+0.00"]
    assert row["average STS (1)"][-3:] == ["50.00", "25.00", "+25.00"]
    assert row["average Retrieval (1)"][-1] == "+0.00"
    assert row["average, all (2)"][-3:] == ["37.50", "25.00", "+12.50"]
    assert row["rationale tokens (mean)"][-2:] == ["2.50", "-"]  # b has no rationale: not measured
    assert row["empty rationales (%)"][-2:] == ["25.00", "-"]
    assert row["perplexity"][-3:] == ["12.50", "3.00", "+9.50"]
    nothing_new = {m: dict(s, texts=0) for m, s in stats.items()}
    cached = mteb_tasks.summary_table(columns, types, nothing_new)
    assert "rationale tokens (mean)" not in cached and "perplexity" not in cached  # all cached


def test_model_meta_files_settings_apart(encoder):
    meta = encoder.mteb_model_meta
    assert meta.name == "grace/tiny" and meta.embed_dim == encoder.model.config.hidden_size
    assert meta.max_tokens == mteb_tasks.DEFAULT_MAX_LENGTH
    assert meta.n_parameters == sum(p.numel() for p in encoder.model.parameters())
    # greedy: neither the seed, top-p nor the batch size can change a score
    import hashlib
    prompt_hash = hashlib.sha1(encoder.system_prompt.encode()).hexdigest()[:10]
    assert meta.experiment_kwargs == dict(rationale=True, instructions=False, max_new_tokens=NEW,
                                          temperature=0.0, max_length=1024, normalize=True,
                                          system_prompt=prompt_hash)
    other = evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                  system_prompt="Describe.", max_length=256, max_new_tokens=NEW)
    kwargs = other.mteb_model_meta.experiment_kwargs
    assert kwargs["max_length"] == 256 and len(kwargs["system_prompt"]) == 10


# --------------------------------------------------------------------- the release's task list

# eval.sh's ALL_TASKS, copied from the release by type (the STS group first, as it runs them)
RELEASE = {
    "STS": "BIOSSES SICK-R STS12 STS13 STS14 STS15 STS16 STS17 STSBenchmark STS22",
    "Summarization": "SummEval",
    "Retrieval": "ArguAna CQADupstackRetrieval FiQA2018 NFCorpus SCIDOCS SciFact ClimateFEVER "
                 "DBPedia NQ FEVER HotpotQA MSMARCO QuoraRetrieval TRECCOVID Touche2020",
    "Reranking": "AskUbuntuDupQuestions MindSmallReranking SciDocsRR StackOverflowDupQuestions",
    "Clustering": "ArxivClusteringP2P ArxivClusteringS2S BiorxivClusteringP2P BiorxivClusteringS2S "
                  "MedrxivClusteringP2P MedrxivClusteringS2S RedditClustering RedditClusteringP2P "
                  "StackExchangeClustering TwentyNewsgroupsClustering",
    "PairClassification": "SprintDuplicateQuestions TwitterSemEval2015 TwitterURLCorpus",
    "Classification": "AmazonCounterfactualClassification AmazonPolarityClassification "
                      "AmazonReviewsClassification Banking77Classification EmotionClassification "
                      "ImdbClassification ToxicConversationsClassification "
                      "MTOPDomainClassification MassiveIntentClassification "
                      "MassiveScenarioClassification MTOPIntentClassification "
                      "TweetSentimentClassification",
}
# mteb 2.26's language subsets of the release's multilingual tasks (every one of them runs)
SUBSETS = {"STS17": 11, "STS22": 18, "AmazonCounterfactualClassification": 4,
           "AmazonReviewsClassification": 6, "MTOPDomainClassification": 6,
           "MTOPIntentClassification": 6, "MassiveIntentClassification": 51,
           "MassiveScenarioClassification": 51, "TweetSentimentClassification": 8}
MSMARCO_LINE = ("MSMARCO: the release asked for split 'test', which mteb 2.26.24 does not define "
                "for this task; grace runs its 'dev' split instead")


def _args(**kw):
    return argparse.Namespace(**dict(dict(tasks=None, benchmark=None, local=None, limit=None,
                                          protocol="grace"), **kw))


def test_release_tasks_are_the_releases_55():
    assert {k: v.split() for k, v in RELEASE.items()} == mteb_tasks.RELEASE_TASKS
    names = [n for group in mteb_tasks.RELEASE_TASKS.values() for n in group]
    assert len(names) == len(set(names)) == 55


def test_release_benchmark_resolves_offline_to_split_test_and_every_subset():
    """All 55 names are in mteb 2.26's registry (metadata only: nothing is downloaded), as typed
    in the release; each runs split "test" (MSMARCO, which has none, its "dev": one line says so)
    and every language subset, not only English."""
    import mteb

    assert mteb.__version__.startswith("2.26")
    lines = []
    tasks = mteb_tasks.resolve_tasks(_args(benchmark="GRACE-release"), say=lines.append)
    assert [t.metadata.name for t in tasks] == [n for v in RELEASE.values() for n in v.split()]
    types = {n: k for k, v in RELEASE.items() for n in v.split()}
    assert all(t.metadata.type == types[t.metadata.name] for t in tasks)
    assert lines == [MSMARCO_LINE]
    splits = {t.metadata.name: list(t.eval_splits) for t in tasks}
    assert splits.pop("MSMARCO") == ["dev"] and set(map(tuple, splits.values())) == {("test",)}
    for task in tasks:
        assert list(task.hf_subsets) == list(task.metadata.hf_subsets)  # nothing filtered out
        assert len(task.hf_subsets) == SUBSETS.get(task.metadata.name, 1), task.metadata.name
    by_name = {t.metadata.name: t for t in tasks}
    assert {"de-en", "zh-en"} <= set(by_name["STS22"].hf_subsets)
    assert {"ja", "sw"} <= set(by_name["MassiveIntentClassification"].hf_subsets)
    # these had a validation split too; the release scores test alone
    assert by_name["MTOPDomainClassification"].metadata.eval_splits == ["validation", "test"]
    # CQADupstackRetrieval: one task of mteb's, the mean of its 12 StackExchange forums
    cqa = by_name["CQADupstackRetrieval"]
    assert cqa.is_aggregate and len(cqa.metadata.tasks) == 12
    assert all(t.metadata.name.startswith("CQADupstack") and list(t.eval_splits) == ["test"]
               for t in cqa.metadata.tasks)


def test_release_protocol_runs_named_hub_tasks_on_split_test():
    names = "MSMARCO,MTOPDomainClassification"
    lines = []
    tasks = mteb_tasks.resolve_tasks(_args(tasks=names, protocol="release"), say=lines.append)
    assert [list(t.eval_splits) for t in tasks] == [["dev"], ["test"]] and lines == [MSMARCO_LINE]
    lines.clear()  # grace's protocol: mteb's own splits, nothing to say
    tasks = mteb_tasks.resolve_tasks(_args(tasks=names), say=lines.append)
    assert [list(t.eval_splits) for t in tasks] == [["dev"], ["validation", "test"]]
    assert lines == []


@pytest.mark.slow  # every mteb benchmark is built
def test_release_protocol_leaves_mtebs_benchmark_objects_alone():
    import mteb

    tasks = mteb_tasks.resolve_tasks(_args(benchmark="MTEB(eng, v1)", protocol="release"),
                                     say=lambda *a, **k: None)
    assert all(list(t.eval_splits) == ["test"] for t in tasks if t.metadata.name != "MSMARCO")
    original = {t.metadata.name: list(t.eval_splits)
                for t in mteb.get_benchmark("MTEB(eng, v1)").tasks}
    assert original["AmazonCounterfactualClassification"] == ["test"]  # (eng: test only)
    assert original["MSMARCO"] == ["dev"]
    with pytest.raises(UsageError, match="close matches: GRACE-release"):
        mteb_tasks.resolve_tasks(_args(benchmark="GRACE-relase"))


def test_model_meta_files_raw_means_apart(encoder):
    raw = evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                max_new_tokens=NEW, normalize=False)
    assert raw.mteb_model_meta.experiment_kwargs["normalize"] is False
    assert raw.mteb_model_meta.experiment_name != encoder.mteb_model_meta.experiment_name
    unit = evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                 max_new_tokens=NEW, normalize=True)
    assert unit.mteb_model_meta.experiment_name == encoder.mteb_model_meta.experiment_name


def test_embedding_settings_by_protocol(tmp_path):
    (tmp_path / "grace.json").write_text('{"max_new_tokens": 5, "max_prompt_tokens": 512}')
    settings, sources = mteb_tasks.embedding_settings(tmp_path, "grace", top_p=0.5)
    assert (settings["max_new_tokens"], settings["max_length"], settings["top_p"]) == (5, 512, 0.5)
    assert (sources["max_new_tokens"], sources["max_length"], sources["top_p"],
            sources["temperature"]) == ("grace.json", "grace.json", "given", "default")
    settings, sources = mteb_tasks.embedding_settings(tmp_path, "release")
    assert (settings["max_new_tokens"], settings["max_length"]) == (2048, 1024)
    assert set(sources.values()) == {"release"}
    (tmp_path / "grace.json").write_text("{cut")  # never read under the release's protocol
    assert mteb_tasks.embedding_settings(tmp_path, "release")[0]["normalize"] is False
    with pytest.raises(UsageError, match="unknown protocol 'paper'"):
        mteb_tasks.embedding_settings(tmp_path, "paper")


# ------------------------------------------------- the result cache: its key, whole files, damage

def _encoder(encoder, **kw):
    return evaluate.GraceEncoder("tiny", model=encoder.model, tokenizer=encoder.tokenizer,
                                 **dict(dict(max_new_tokens=NEW, batch_size=8), **kw))


def test_result_key_holds_every_setting_that_changes_a_score(encoder):
    """Each of these changes the embeddings, so each gets its own SETTINGS folder; the seed,
    top-p and batch size only when sampling, and the decoding not at all without a rationale."""
    import policy

    base = _encoder(encoder).mteb_model_meta.experiment_name
    changed = [dict(max_new_tokens=NEW + 1), dict(temperature=1.0), dict(normalize=False),
               dict(rationale=False), dict(system_prompt="Describe."), dict(max_length=512),
               dict(instructions=True)]
    names = [_encoder(encoder, **kw).mteb_model_meta.experiment_name for kw in changed]
    assert base not in names and len(set(names)) == len(names)
    greedy = [_encoder(encoder, **kw).mteb_model_meta.experiment_name
              for kw in (dict(batch_size=5), dict(seed=3), dict(top_p=0.5))]
    assert set(greedy) == {base}  # greedy: a text's rationale depends on none of them
    sampled = dict(temperature=1.0, batch_size=32)
    name = _encoder(encoder, **sampled).mteb_model_meta.experiment_name
    others = [_encoder(encoder, **dict(sampled, **kw)).mteb_model_meta.experiment_name
              for kw in (dict(batch_size=5), dict(seed=3), dict(top_p=0.5))]
    assert name not in others and len(set(others)) == 3
    alone = [_encoder(encoder, rationale=False, **kw).mteb_model_meta.experiment_name
             for kw in (dict(), dict(temperature=1.0, batch_size=5), dict(max_new_tokens=3))]
    assert len(set(alone)) == 1
    # the protocol is not a setting of its own: the same settings reached either way share
    release = _encoder(encoder, protocol="release", max_new_tokens=NEW, temperature=0.0,
                       normalize=True, system_prompt=policy.DEFAULT_SYSTEM_PROMPT)
    assert release.mteb_model_meta.experiment_name == base


def _pairs(path, scores):
    rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i}", "score": s}
            for i, s in enumerate(scores)]
    return _write(path, rows)


def _run(encoder, path, cache, lines):
    task = mteb_tasks.local_task(path)
    task.load_data()
    return mteb_tasks.evaluate_model(encoder, [task], cache, 8,
                                     say=lambda line, **k: lines.append(line))


def test_result_cache_recomputes_an_edited_file_and_a_damaged_result(encoder, tmp_path):
    lines = []
    cache = mteb_tasks.result_cache(tmp_path / "cache", say=lambda line, **k: lines.append(line))
    path = _pairs(tmp_path / "pairs.jsonl", [1.0, 2.0, 3.0, 4.0])
    first = _run(encoder, path, cache, lines)
    assert "(cached)" not in lines[-1]
    assert _run(encoder, path, cache, lines) == pytest.approx(first, abs=1e-6)  # rounded JSON
    assert "(cached)" in lines[-1]
    # an edit that keeps the file's size: the old score must not come back
    _pairs(path, [4.0, 3.0, 2.0, 1.0])
    lines.clear()
    edited = _run(encoder, path, cache, lines)
    assert "its data changed since the cached result" in lines[0]
    assert "(cached)" not in lines[-1] and edited != pytest.approx(first, abs=1e-3)
    # a result file cut to 0 bytes (a kill, a full disk): one line, then recomputed and rewritten
    result = cache.get_task_result_path("LocalSTS_pairs", encoder.mteb_model_meta)
    result.write_text("")
    lines.clear()
    assert _run(encoder, path, cache, lines) == pytest.approx(edited, abs=1e-6)
    assert len(lines) == 2 and "is damaged" in lines[0] and "recomputing it" in lines[0]
    assert json.loads(result.read_text())["task_name"] == "LocalSTS_pairs"


def test_result_files_are_written_whole_or_not_at_all(encoder, tmp_path, monkeypatch):
    """A disk that fills up while mteb writes a result leaves the previous file as it was."""
    import mteb.results.task_result as task_result

    lines = []
    cache = mteb_tasks.result_cache(tmp_path / "cache", say=lambda line, **k: lines.append(line))
    path = _pairs(tmp_path / "pairs.jsonl", [1.0, 2.0, 3.0, 4.0])
    _run(encoder, path, cache, lines)
    result = cache.get_task_result_path("LocalSTS_pairs", encoder.mteb_model_meta)
    before = result.read_bytes()

    def full_disk(obj, f, **kw):
        f.write('{"dataset_revision": "')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(task_result.json, "dump", full_disk)
    task = mteb_tasks.local_task(path)
    task.load_data()
    with pytest.raises(UsageError, match="could not be written .No space left on device.; the "
                                         "results already there are kept"):
        mteb_tasks.evaluate_model(encoder, [task], cache, 8, overwrite="always",
                                  say=lambda *a, **k: None)
    assert result.read_bytes() == before
    assert sorted(p.name for p in result.parent.iterdir()) == [  # no staging folder left
        "LocalSTS_pairs.json", "model_meta.json", "run_settings.jsonl"]


def test_mtebs_own_result_cache_reads_graces_results(encoder, tmp_path):
    """The documented call (docs/evaluation.md) returns the scores evaluate.py printed."""
    import mteb

    path = _pairs(tmp_path / "pairs.jsonl", [1.0, 2.0, 3.0, 4.0])
    scores = _run(encoder, path, mteb_tasks.result_cache(tmp_path / "cache", say=print), [])
    results = mteb.ResultCache(cache_path=tmp_path / "cache").load_results(
        models=["grace/tiny"], tasks=["LocalSTS_pairs"], load_experiments="match_name")
    [model] = results.model_results
    assert (model.model_name, model.model_revision) == ("grace/tiny", "tiny-seed0")
    assert model.experiment_name == encoder.mteb_model_meta.experiment_name
    [task] = model.task_results
    assert task.get_score() == pytest.approx(scores["LocalSTS_pairs"], abs=1e-6)
    by_meta = mteb.ResultCache(cache_path=tmp_path / "cache").load_results(
        models=[encoder.mteb_model_meta], tasks=["LocalSTS_pairs"])  # mteb's default: kwargs
    assert [t.get_score() for m in by_meta.model_results for t in m.task_results] == \
        [task.get_score()]
