"""infra/data.py: every reader returns the right rows, or fails as one line naming file, line and
field."""
import json

import pytest

from infra import data
from infra.data import DataError


def write(folder, name, content):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(folder, name, rows):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return write(folder, name, text)


def fails(fn, *args, contains=()):
    """fn(*args) raises a one-line DataError holding every string of `contains`."""
    with pytest.raises(DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in contains:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


TRIPLE = {"query": "q", "positive": "p", "negative": "n"}


# ----------------------------------------------------------------------------- read_lines

def test_read_lines_splits_on_newline_only(tmp_path):
    p = write(tmp_path, "a.txt", "\ufeffone\u2028still one\r\ntwo\x85\x0ctwo\n\nfour")
    assert data.read_lines(p) == [(1, "one\u2028still one"), (2, "two\x85\x0ctwo"), (3, ""),
                                  (4, "four")]


def test_read_lines_invalid_utf8_names_the_line(tmp_path):
    p = write(tmp_path, "a.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
    fails(data.read_lines, p, contains=(f"{p}:3:", "UTF-8"))
    fails(data.load_records, p, "unsupervised", contains=(f"{p}:3:",))


def test_read_lines_missing_file_and_folder(tmp_path):
    fails(data.read_lines, tmp_path / "nope.jsonl", contains=("nope.jsonl", "no such file"))
    fails(data.read_lines, tmp_path, contains=(str(tmp_path), "folder"))
    fails(data.load_records, tmp_path / "nope.jsonl", "supervised", contains=("no such file",))
    fails(data.read_rows, tmp_path / "nope.parquet", contains=("no such file",))


# ----------------------------------------------------------------------------- read_rows

def test_jsonl_with_bom_and_blank_lines(tmp_path):
    p = write(tmp_path, "a.jsonl", '\ufeff{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert data.read_rows(p) == [(1, {"text": "a"}), (4, {"text": "b"})]


def test_u2028_inside_a_jsonl_string_is_one_record(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"text": "x\u2028y"}\n{"text": "z\u0085w"}\n')
    assert [r["text"] for r in data.load_records(p, "unsupervised")] == ["x\u2028y", "z\u0085w"]


def test_u2028_inside_a_txt_line_is_one_record(tmp_path):
    p = write(tmp_path, "a.txt", "first\u2028half\nsecond\n\n")
    assert data.load_records(p, "unsupervised") == [{"text": "first\u2028half"},
                                                    {"text": "second"}]


def test_json_array_gets_the_jsonl_hint(tmp_path):
    p = write(tmp_path, "a.json", json.dumps([TRIPLE, TRIPLE], indent=1))
    fails(data.load_records, p, "supervised",
          contains=(str(p), "is a JSON array: write one object per line (JSONL)"))
    p = write(tmp_path, "b.jsonl", json.dumps([TRIPLE]))
    fails(data.read_rows, p, contains=("is a JSON array",))


def test_invalid_json_and_non_object_name_the_line(tmp_path):
    p = write(tmp_path, "a.jsonl", json.dumps(TRIPLE) + "\n{bad\n")
    fails(data.read_rows, p, contains=(f"{p}:2:", "invalid JSON"))
    p = write(tmp_path, "c.jsonl", json.dumps(TRIPLE, indent=2))
    fails(data.read_rows, p, contains=(f"{p}:1:", "several lines", "JSONL"))
    p = write(tmp_path, "b.jsonl", json.dumps(TRIPLE) + '\n"just a string"\n')
    fails(data.read_rows, p, contains=(f"{p}:2:", "expected a JSON object, got a string"))


def test_csv_bom_quotes_and_physical_line_numbers(tmp_path):
    p = write(tmp_path, "a.csv",
              '\ufeffquery,positive,negative\r\n"multi\nline",p1,n1\r\n\r\nq2,"a, b",n2\r\n')
    rows = data.read_rows(p)
    assert rows == [(2, {"query": "multi\nline", "positive": "p1", "negative": "n1"}),
                    (5, {"query": "q2", "positive": "a, b", "negative": "n2"})]
    p = write(tmp_path, "b.csv", "query,positive,negative\nq,p,n\nq, ,n\n")
    fails(data.load_records, p, "supervised",
          contains=(f"{p}:3:", "field 'positive'", "whitespace"))


def test_csv_wrong_field_count_names_the_line(tmp_path):
    p = write(tmp_path, "a.csv", "text,label\na,1\nb,1,extra\n")
    fails(data.read_rows, p, contains=(f"{p}:3:", "3 fields", "header"))


def test_tsv_has_no_quoting(tmp_path):
    p = write(tmp_path, "a.tsv", 'text\tlabel\n"quoted" start, with comma\tx\n')
    assert data.read_rows(p) == [(2, {"text": '"quoted" start, with comma', "label": "x"})]


def test_unknown_suffix(tmp_path):
    p = write(tmp_path, "a.xml", "<a/>")
    fails(data.read_rows, p, contains=(str(p), "unknown format"))


def test_parquet_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    p = tmp_path / "a.parquet"
    datasets.Dataset.from_list([TRIPLE, dict(TRIPLE, negative="   ")]).to_parquet(str(p))
    assert data.read_rows(p)[0] == (1, TRIPLE)
    fails(data.load_records, p, "supervised", contains=(f"{p}:2:", "field 'negative'"))


def test_unreachable_hub_name_is_one_line():
    pytest.importorskip("datasets")  # conftest sets HF_DATASETS_OFFLINE: fails at once
    fails(data.read_rows, "nobody/no-such-dataset-xyz",
          contains=("nobody/no-such-dataset-xyz: cannot read",))


def test_broken_parquet_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    p = write(tmp_path, "a.parquet", b"not parquet at all")
    fails(data.read_rows, p, contains=(str(p), "cannot read"))


# ----------------------------------------------------------------------------- load_records

def test_load_records_supervised_with_aliases_and_negative_list(tmp_path):
    aliased = {"anchor": "a", "positive": "p", "hard_negative": ["n1", "n2"], "x": 1}
    p = jsonl(tmp_path, "a.jsonl", [TRIPLE, aliased])
    assert data.load_records(p, "supervised") == [TRIPLE, {"query": "a", "positive": "p",
                                                           "negative": "n1"}]


@pytest.mark.parametrize("row, field, words", [
    ({"positive": "p", "negative": "n"}, "query", ("missing", "(or 'anchor')")),
    (dict(TRIPLE, positive=3), "positive", ("must be a string", "a number")),
    (dict(TRIPLE, negative=None), "negative", ("missing",)),
    (dict(TRIPLE, negative=[]), "negative", ("empty list",)),
    (dict(TRIPLE, negative=[7]), "negative", ("must be a string",)),
    (dict(TRIPLE, query=""), "query", ("is empty",)),
    (dict(TRIPLE, query=" \t\u3000"), "query", ("only whitespace",)),
])
def test_load_records_bad_field(tmp_path, row, field, words):
    p = jsonl(tmp_path, "a.jsonl", [TRIPLE, row])
    fails(data.load_records, p, "supervised", contains=(f"{p}:2:", f"field '{field}'", *words))


def test_load_records_unsupervised_whitespace_and_mode_hints(tmp_path):
    p = jsonl(tmp_path, "a.jsonl", [{"text": "a"}, {"text": "   "}])
    fails(data.load_records, p, "unsupervised", contains=(f"{p}:2:", "field 'text'", "whitespace"))
    p = jsonl(tmp_path, "b.jsonl", [{"text": "a"}])
    fails(data.load_records, p, "supervised",
          contains=(f"{p}:1:", "field 'query'", "--mode unsupervised"))
    p = jsonl(tmp_path, "c.jsonl", [TRIPLE])
    fails(data.load_records, p, "unsupervised",
          contains=(f"{p}:1:", "field 'text'", "--mode supervised"))


def test_txt_in_supervised_mode_gets_the_hint(tmp_path):
    p = write(tmp_path, "a.txt", "a text\n")
    fails(data.load_records, p, "supervised",
          contains=(str(p), "a .txt file holds one text per line: use --mode unsupervised"))


def test_no_records(tmp_path):
    p = write(tmp_path, "a.jsonl", "\n\n")
    fails(data.load_records, p, "supervised", contains=(str(p), "no records"))
    with pytest.raises(ValueError):
        data.load_records(p, "semi")


def test_sample_data_loads():
    path = data.Path(__file__).parents[2] / "data" / "sample_triples.jsonl"
    assert len(data.load_records(path, "supervised")) > 1


# ----------------------------------------------------------------------------- load_sts_pairs

def sts(i, score):
    return {"sentence1": f"a{i}", "sentence2": f"b{i}", "score": score}


def test_sts_pairs_and_limit(tmp_path):
    p = jsonl(tmp_path, "s.jsonl", [sts(0, 1), sts(1, 2.5), sts(2, "bad")])
    assert data.load_sts_pairs(p, limit=2) == [("a0", "b0", 1.0), ("a1", "b1", 2.5)]
    fails(data.load_sts_pairs, p, contains=(f"{p}:3:", "field 'score'", "must be a number"))


@pytest.mark.parametrize("bad, words", [
    ("true", ("a boolean",)), ("NaN", ("finite", "nan")), ("Infinity", ("finite", "inf")),
    ("-Infinity", ("finite",)), ('"3.0"', ("a string",)), ("null", ("must be a number",))])
def test_sts_bad_score(tmp_path, bad, words):
    p = write(tmp_path, "s.jsonl", json.dumps(sts(0, 1))
              + '\n{"sentence1": "x", "sentence2": "y", "score": ' + bad + "}\n"
              + json.dumps(sts(2, 3)) + "\n")
    fails(data.load_sts_pairs, p, contains=(f"{p}:2:", "field 'score'", *words))


def test_sts_missing_score_and_blank_sentence(tmp_path):
    p = jsonl(tmp_path, "s.jsonl", [sts(0, 1), {"sentence1": "x", "sentence2": "y"}])
    fails(data.load_sts_pairs, p, contains=(f"{p}:2:", "field 'score'", "missing"))
    p = jsonl(tmp_path, "t.jsonl", [sts(0, 1), dict(sts(1, 2), sentence2="  ")])
    fails(data.load_sts_pairs, p, contains=(f"{p}:2:", "field 'sentence2'", "whitespace"))


def test_sts_one_row(tmp_path):
    p = jsonl(tmp_path, "s.jsonl", [sts(0, 1)])
    fails(data.load_sts_pairs, p, contains=(str(p), "at least 2 pairs", "found 1"))


def test_sts_constant_scores(tmp_path):
    p = jsonl(tmp_path, "s.jsonl", [sts(0, 3), sts(1, 3.0), sts(2, 3)])
    fails(data.load_sts_pairs, p, contains=(str(p), "all scores", "equal 3", "constant"))
    p = jsonl(tmp_path, "t.jsonl", [sts(0, 3), sts(1, 3), sts(2, 4)])
    fails(data.load_sts_pairs, p, 2, contains=("the first 2 rows",))
    assert len(data.load_sts_pairs(p)) == 3


# ----------------------------------------------------------------------------- load_retrieval

def beir(tmp_path, corpus=None, queries=None,
         qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\n"):
    folder = tmp_path / "beir"
    jsonl(folder, "corpus.jsonl", corpus or [{"_id": "d1", "title": "T", "text": "doc one"},
                                             {"_id": "d2", "text": "doc two"},
                                             {"_id": 3, "title": "Only", "text": ""}])
    jsonl(folder, "queries.jsonl", queries or [{"_id": "q1", "text": "query one"},
                                               {"_id": "q2", "text": "two"}])
    if qrels is not None:
        write(folder, "qrels/test.tsv", qrels)
    return folder


def test_retrieval_loads(tmp_path):
    corpus, queries, qrels = data.load_retrieval(beir(tmp_path))
    assert corpus == {"d1": ("T", "doc one"), "d2": ("", "doc two"), "3": ("Only", "")}
    assert queries == {"q1": "query one", "q2": "two"}
    assert qrels == {"test": {"q1": {"d1": 1}, "q2": {"d2": 0}}}


def test_retrieval_duplicate_ids_name_both_lines(tmp_path):
    folder = beir(tmp_path, corpus=[{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"},
                                    {"_id": "d1", "text": "c"}])
    fails(data.load_retrieval, folder,
          contains=(f"{folder / 'corpus.jsonl'}:3:", "duplicate _id 'd1'", "line 1"))
    folder = beir(tmp_path, queries=[{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}])
    fails(data.load_retrieval, folder,
          contains=(f"{folder / 'queries.jsonl'}:2:", "duplicate _id 'q1'", "line 1"))


def test_retrieval_blank_texts(tmp_path):
    folder = beir(tmp_path, corpus=[{"_id": "d1", "text": " "}])
    fails(data.load_retrieval, folder, contains=(f"{folder / 'corpus.jsonl'}:1:", "field 'text'"))
    folder = beir(tmp_path, queries=[{"_id": "q1", "text": "a"}, {"_id": "q2"}])
    fails(data.load_retrieval, folder,
          contains=(f"{folder / 'queries.jsonl'}:2:", "field 'text'", "missing"))


@pytest.mark.parametrize("qrels, words", [
    ("q1\td1\n", ("expected 3 tab-separated fields", "found 2")),
    ("q1\td1\t0.5\n", ("field 'score'", "integer", "0.5")),
    ("q1\td1\t1\nq9\td1\t1\n", ("query-id 'q9'", "queries.jsonl")),
    ("q1\td9\t1\n", ("corpus-id 'd9'", "corpus.jsonl")),
])
def test_retrieval_bad_qrels_row(tmp_path, qrels, words):
    folder = beir(tmp_path, qrels=qrels)
    line = qrels.count("\n")
    fails(data.load_retrieval, folder,
          contains=(f"{folder / 'qrels' / 'test.tsv'}:{line}:", *words))


def test_retrieval_qrels_header_only_no_relevant_no_files(tmp_path):
    folder = beir(tmp_path, qrels="query-id\tcorpus-id\tscore\n")
    fails(data.load_retrieval, folder, contains=("test.tsv", "only a header"))
    folder = beir(tmp_path, qrels="q1\td1\t0\nq2\td2\t0\n")
    fails(data.load_retrieval, folder, contains=("test.tsv", "no relevant document"))
    (folder / "qrels" / "test.tsv").unlink()
    fails(data.load_retrieval, folder, contains=("qrels", "no .tsv"))
    fails(data.load_retrieval, tmp_path / "none", contains=("not a folder",))


def test_retrieval_missing_corpus(tmp_path):
    folder = beir(tmp_path)
    (folder / "corpus.jsonl").unlink()
    fails(data.load_retrieval, folder, contains=("corpus.jsonl", "no such file"))


# ----------------------------------------------------------------------------- load_classification

def labelled(n_per_label, labels=("a", "b")):
    return [{"text": f"{lab} text {i}", "label": lab}
            for lab in labels for i in range(n_per_label)]


def test_classification_file_split_per_label(tmp_path):
    sevens = [{"text": "c 1", "category": 7}, {"text": "c 2", "category": 7}]
    p = jsonl(tmp_path, "c.jsonl", labelled(10) + sevens)
    out = data.load_classification(p)
    test_labels = [lab for _, lab in out["test"]]
    assert test_labels.count("a") == 2 and test_labels.count("b") == 2
    assert test_labels.count("7") == 1
    assert len(out["train"]) + len(out["test"]) == 22
    assert not {t for t, _ in out["train"]} & {t for t, _ in out["test"]}
    assert data.load_classification(p) == out  # seeded


def test_classification_split_is_the_one_evaluate_always_made(tmp_path):
    # pinned from evaluate._split_rows before the move: earlier scores were measured on these rows
    rows = [(f"t{i}", "ab"[i % 3 == 0]) for i in range(30)]
    assert data.split_rows(rows)["test"] == [("t2", "a"), ("t11", "a"), ("t26", "a"), ("t10", "a"),
                                             ("t21", "b"), ("t6", "b")]


def test_classification_csv(tmp_path):
    p = write(tmp_path, "c.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    out = data.load_classification(p)
    assert {lab for _, lab in out["test"]} == {"0", "1"}


def test_classification_one_class(tmp_path):
    p = jsonl(tmp_path, "c.jsonl", labelled(5, labels=("only",)))
    fails(data.load_classification, p, contains=(str(p), "at least 2 labels", "found 1", "'only'"))


def test_classification_singleton_label(tmp_path):
    p = jsonl(tmp_path, "c.jsonl", labelled(5) + [{"text": "lonely", "label": "z"}])
    fails(data.load_classification, p, contains=(f"{p}:11:", "label 'z'", "single row"))


@pytest.mark.parametrize("label, words", [(True, ("a boolean",)), ("", ("empty",)),
                                          (" ", ("empty",)), (None, ("missing",)),
                                          (1.5, ("a number",))])
def test_classification_bad_label(tmp_path, label, words):
    p = jsonl(tmp_path, "c.jsonl", labelled(3) + [{"text": "x", "label": label}])
    fails(data.load_classification, p, contains=(f"{p}:7:", "field 'label'", *words))


def test_classification_blank_text(tmp_path):
    p = jsonl(tmp_path, "c.jsonl", labelled(3) + [{"text": "  ", "label": "a"}])
    fails(data.load_classification, p, contains=(f"{p}:7:", "field 'text'"))


def test_classification_folder_used_as_given_and_leak_removed(tmp_path):
    folder = tmp_path / "cls"
    jsonl(folder, "train.jsonl", labelled(3))
    jsonl(folder, "test.jsonl", [{"text": "a text 0", "label": "a"},
                                 {"text": "new a", "label": "a"}, {"text": "new b", "label": "b"}])
    with pytest.warns(UserWarning, match="dropped 1 test rows"):
        out = data.load_classification(folder)
    assert out["test"] == [("new a", "a"), ("new b", "b")]
    assert len(out["train"]) == 6


def test_classification_leak_in_a_single_file(tmp_path):
    p = jsonl(tmp_path, "c.jsonl",
              [{"text": "same", "label": "a"}] * 5 + labelled(5, labels=("b",)))
    with pytest.warns(UserWarning, match="dropped 1 test rows"):
        out = data.load_classification(p)
    assert "same" not in {t for t, _ in out["test"]}


def test_classification_folder_errors(tmp_path):
    folder = tmp_path / "cls"
    jsonl(folder, "train.jsonl", labelled(3))
    fails(data.load_classification, folder, contains=("no test.csv",))
    jsonl(folder, "test.jsonl", [{"text": "new", "label": "zz"}])
    fails(data.load_classification, folder,
          contains=(f"{folder / 'test.jsonl'}:1:", "label 'zz'", "never occurs"))
    jsonl(folder, "test.jsonl", [{"text": "a text 0", "label": "a"}])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no test rows left"):
        data.load_classification(folder)
