"""--limit / --corpus-limit on the local tasks (infra/mteb_tasks.py), and the console output of the
entry points (infra/console.py): the heartbeat line in a log, the third-party noise turned off.

Small files written here; no model but the tiny one, no sleeping (a fake clock).
"""
import argparse
import importlib
import io
import json
import random
import re
import sys
import warnings
from pathlib import Path

import pytest

from helpers import ROOT
from infra import cli, console, mteb_tasks


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _beir(folder, n_docs=60, n_queries=8):
    """Query q{i} judges d{2i} (relevant) and d{2i+1} (score 0); the qrels list the queries in
    reverse id order, so "the first N" is the file's order, not the ids'."""
    _write(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"document {i}"}
                                     for i in range(n_docs)])
    _write(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"}
                                      for i in range(n_queries)])
    lines = ["query-id\tcorpus-id\tscore"]
    for i in reversed(range(n_queries)):
        lines += [f"q{i}\td{2 * i}\t1", f"q{i}\td{2 * i + 1}\t0"]
    _write(folder / "qrels" / "test.tsv", lines)
    return folder


def _args(**kw):
    return argparse.Namespace(**dict(dict(tasks=None, benchmark=None, local=None, limit=None,
                                          corpus_limit=None, protocol="grace"), **kw))


# ------------------------------------------------------------- retrieval: --limit, --corpus-limit

def test_retrieval_slice_keeps_first_queries_their_judged_docs_and_a_seeded_sample():
    docs = [f"d{i}" for i in range(100)]
    qrels = {"q9": {"d5": 1, "d6": 0}, "q1": {"d70": 2}, "q4": {"d5": 1, "d99": 1}}
    kept, kept_docs, counts = mteb_tasks.retrieval_slice(qrels, docs, limit=2, corpus_limit=7)
    assert list(kept) == ["q9", "q1"] and kept == {"q9": {"d5": 1, "d6": 0}, "q1": {"d70": 2}}
    judged = {"d5", "d6", "d70"}
    assert judged <= set(kept_docs)  # every document judged for a kept query
    others = set(kept_docs) - judged
    assert len(others) == 7 and counts == dict(judged=3, other=7, others=97)
    # the sample is random.Random(0).sample of the other documents, in corpus order
    expected = set(random.Random(0).sample([d for d in docs if d not in judged], 7))
    assert others == expected
    assert kept_docs == [d for d in docs if d in judged | expected]
    again = mteb_tasks.retrieval_slice(qrels, docs, limit=2, corpus_limit=7)
    assert again == (kept, kept_docs, counts)  # the same documents every run
    other_seed = mteb_tasks.retrieval_slice(qrels, docs, limit=2, corpus_limit=7, seed=1)[1]
    assert set(other_seed) - judged != others


def test_retrieval_slice_defaults_and_zero_keep_what_is_documented():
    docs = [f"d{i}" for i in range(100)]
    qrels = {"q9": {"d5": 1, "d6": 0}, "q1": {"d70": 2}, "q4": {"d5": 1, "d99": 1}}
    # --limit alone: CORPUS_PER_JUDGED others per judged document
    _, kept_docs, counts = mteb_tasks.retrieval_slice(qrels, docs, limit=2)
    assert counts["other"] == mteb_tasks.CORPUS_PER_JUDGED * 3
    assert len(kept_docs) == 3 + counts["other"]
    for limit in (2, None):  # --corpus-limit 0, or no limit at all: the whole corpus
        corpus_limit = 0 if limit else None
        kept, kept_docs, counts = mteb_tasks.retrieval_slice(qrels, docs, limit, corpus_limit)
        assert kept_docs == docs and counts["other"] == counts["others"]
    assert list(mteb_tasks.retrieval_slice(qrels, docs)[0]) == ["q9", "q1", "q4"]
    # more asked for than there are: all of them
    assert mteb_tasks.retrieval_slice(qrels, docs, 1, 10 ** 6)[1] == docs


def test_local_retrieval_limit_loads_the_slice_and_says_what_it_kept(tmp_path):
    folder = _beir(tmp_path / "beir")
    lines = []
    task, = mteb_tasks.resolve_tasks(_args(local=[str(folder)], limit=3, corpus_limit=5),
                                     say=lines.append)
    assert task.metadata.name == "LocalRetrieval_beir_first3_docs5"
    split = task.dataset["default"]["test"]
    assert split["queries"]["id"] == ["q7", "q6", "q5"]  # the qrels file's first three
    assert split["relevant_docs"] == {f"q{i}": {f"d{2 * i}": 1, f"d{2 * i + 1}": 0}
                                      for i in (7, 6, 5)}
    ids = split["corpus"]["id"]
    judged = {f"d{i}" for i in range(10, 16)}
    assert judged <= set(ids) and len(ids) == 6 + 5
    assert split["corpus"]["text"][ids.index("d12")] == "document 12"
    assert lines == ["LocalRetrieval_beir_first3_docs5: split test: 3 of 8 queries, their 6 judged "
                     "documents and 5 of the 54 others (a sample, seed 0)"]
    again = mteb_tasks.local_task(folder, 3, 5)
    again.load_data()
    assert again.dataset["default"]["test"]["corpus"]["id"] == ids  # seeded: the same sample


def test_local_retrieval_without_limit_or_with_corpus_limit_0_keeps_the_whole_corpus(tmp_path):
    folder = _beir(tmp_path / "beir")
    for limit, corpus_limit, name in ((None, None, "LocalRetrieval_beir"),
                                      (2, 0, "LocalRetrieval_beir_first2_alldocs")):
        lines = []
        task, = mteb_tasks.resolve_tasks(_args(local=[str(folder)], limit=limit,
                                               corpus_limit=corpus_limit), say=lines.append)
        split = task.dataset["default"]["test"]
        assert task.metadata.name == name and len(split["corpus"]) == 60
        assert len(split["queries"]) == (limit or 8)
        assert lines == ([] if limit is None else
                         [f"{name}: split test: 2 of 8 queries, their 4 judged documents and "
                          "56 of the 56 others (a sample, seed 0)"])


def test_corpus_limit_flag_range_and_hub_tasks_refused(capsys):
    assert cli.evaluate_args(["--local", "x", "--limit", "5", "--corpus-limit", "0"]
                             ).corpus_limit == 0
    for argv, message in ((["--local", "x", "--corpus-limit", "-1"], "--corpus-limit must be in"),
                          (["--tasks", "STS12", "--corpus-limit", "9"],
                           "--corpus-limit cuts --local tasks only")):
        with pytest.raises(SystemExit) as e:
            cli.evaluate_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- STS and classification: --limit

def test_limit_keeps_the_first_sts_pairs_and_each_label_in_turn(tmp_path):
    sts = _write(tmp_path / "pairs.jsonl", [{"sentence1": f"a{i}", "sentence2": f"b{i}",
                                             "score": i % 5} for i in range(10)])
    task = mteb_tasks.local_task(sts, limit=4)
    task.load_data()
    assert task.dataset["test"]["sentence1"] == ["a0", "a1", "a2", "a3"]
    # a train/test folder sorted by label: the first row of each label in turn, N per split
    for split in ("train", "test"):
        _write(tmp_path / "cls" / f"{split}.jsonl",
               [{"text": f"{split} {label}{i}", "label": label} for label in "xyz"
                for i in range(4)])
    task = mteb_tasks.local_task(tmp_path / "cls", limit=5)
    task.load_data()
    for split in ("train", "test"):
        assert task.dataset[split]["text"] == [f"{split} {t}" for t in
                                               ("x0", "y0", "z0", "x1", "y1")]
        assert task.dataset[split]["label"] == [0, 1, 2, 0, 1]
    assert mteb_tasks.local_task(sts, limit=4, corpus_limit=3).metadata.name == \
        "LocalSTS_pairs_first4"  # --corpus-limit is a retrieval setting only


# --------------------------------------------------------------------- the heartbeat in a log

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_heartbeat_prints_a_line_per_interval_with_rate_and_time_left():
    clock, lines = FakeClock(), []
    beat = console.Heartbeat(total=100, desc="SciFact", every=30, clock=clock, write=lines.append)
    clock.now += 10
    beat.update(10)
    assert lines == []  # before the first interval: nothing
    clock.now += 30  # 40 s in, 40 texts: 1.0 texts/s, 60 left
    beat.set_postfix(rationale="22 tok", refresh=False)
    beat.update(30)
    assert lines == ["   SciFact: 40/100 texts, 1.0 texts/s, about 1m00s left (rationale 22 tok)"]
    clock.now += 29
    beat.update(10)
    assert len(lines) == 1  # 29 s since the last line
    clock.now += 1  # 70 s, 50 texts
    beat.update(0)
    assert lines[-1] == "   SciFact: 50/100 texts, 0.7 texts/s, about 1m10s left (rationale 22 tok)"
    beat.close()


def test_progress_bar_is_tqdm_on_a_terminal_and_a_heartbeat_in_a_log(monkeypatch):
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(console.progress_bar(total=3, desc="x"), console.Heartbeat)
    assert console.progress_bar(total=3, disable=True).disable  # asked off: off
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = console.progress_bar(total=3, desc="x")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()


def test_encode_texts_prints_heartbeat_lines_in_a_log(tiny, monkeypatch, capsys):
    import evaluate

    model, tokenizer = tiny
    monkeypatch.setattr(console, "HEARTBEAT_SECONDS", 0.0)  # a line after every batch
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal
    evaluate.encode_texts(model, tokenizer, ["one text", "two", "three"], batch_size=2,
                          max_new_tokens=2, progress=None, desc="LocalSTS_x")
    out = capsys.readouterr().out.splitlines()
    assert [re.sub(r"[\d.]+ texts/s.*", "", line) for line in out] == [
        "   LocalSTS_x: 2/3 texts, ", "   LocalSTS_x: 3/3 texts, "]
    evaluate.encode_texts(model, tokenizer, ["one text"], max_new_tokens=2, progress=False)
    assert capsys.readouterr().out == ""  # progress=False (--no-progress, other ranks): silent


# ------------------------------------------------------------------------- third-party noise off

@pytest.fixture
def restore_libraries(monkeypatch):
    """quiet() changes process-wide switches: put each back after the test."""
    from transformers.utils import logging as transformers_logging

    # the modules (their packages export a function or class of the same name)
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    datasets_tqdm = importlib.import_module("datasets.utils.tqdm")

    monkeypatch.setattr(transformers_logging, "_tqdm_active", transformers_logging._tqdm_active)
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", dict(hub_tqdm.progress_bar_states))
    monkeypatch.setattr(datasets_tqdm, "_hf_datasets_progress_bars_disabled",
                        datasets_tqdm._hf_datasets_progress_bars_disabled)
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's value is undone after it
        monkeypatch.delenv(name)
    with warnings.catch_warnings():
        yield transformers_logging


def test_quiet_silences_the_known_warnings_only(restore_libraries):
    console.quiet()

    def shown(message, module, category=UserWarning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return len(caught) == 1

    sklearn = "sklearn.linear_model._logistic"
    assert not shown("The number of unique classes is greater than 50% of the number of "
                     "samples.", sklearn)
    assert not shown("Precision is ill-defined and being set to 0.0 in labels with no "
                     "predicted samples.", "sklearn.metrics._classification")
    assert not shown("The task 'STSBenchmark' is superseded by 'STSBenchmark.v2'.",
                     "mteb.evaluate")
    # the same words elsewhere, and every other warning, still show
    assert shown("The number of unique classes is greater than 50%", "mypackage")
    assert shown("lbfgs failed to converge (status=1)", "sklearn.linear_model._logistic")
    assert shown("a real problem", "mteb.evaluate")


def test_quiet_turns_the_library_bars_off_and_hub_downloads_off_in_a_log(restore_libraries,
                                                                         monkeypatch):
    import datasets
    import huggingface_hub.utils as hub

    transformers_logging = restore_libraries
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log
    console.quiet()
    assert not transformers_logging.is_progress_bar_enabled()  # "Loading weights"
    assert datasets.utils.are_progress_bars_disabled()  # Map, Generating split
    assert hub.are_progress_bars_disabled()  # downloads: off in a log

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    console.quiet()
    assert not transformers_logging.is_progress_bar_enabled()
    assert not hub.are_progress_bars_disabled()  # a download keeps its bar on a terminal


# -------------------------------------------------------------------- task names in the examples

def test_examples_name_current_mteb_tasks():
    """Every `--tasks A,B` of the docs, evaluate.py and the CLI's help names a task mteb 2.26 does
    not mark superseded (STSBenchmark -> STSBenchmark.v2)."""
    import mteb

    files = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "evaluate.py", ROOT / "infra" / "cli.py"]
    named = {}
    for f in files:
        for m in re.finditer(r"--tasks[ =]([A-Za-z0-9.,-]+)|e\.g\. ([A-Za-z0-9.-]+,[\w.,-]+)",
                             f.read_text(encoding="utf-8")):
            for name in (m.group(1) or m.group(2)).strip(",.").split(","):
                named.setdefault(name, Path(f).name)
    assert "STSBenchmark.v2" in named
    old = {n: where for n, where in named.items() if mteb.get_task(n).superseded_by}
    assert old == {}
