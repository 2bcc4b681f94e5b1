"""Every file the project reads, checked on the way in: a bad row fails as one line naming file,
line and field.

    DataError("triples.jsonl:12: field 'negative' (or 'hard_negative') is empty")

The command-line tools print a DataError as one line and exit with status 2.

Data formats
------------
Text encoding: UTF-8, with or without a byte-order mark. Lines end at "\\n" (or "\\r\\n") only:
U+2028, U+0085 and form feeds are ordinary characters inside a text, never line breaks. Bytes that
are not UTF-8 fail with the line they are on. Whitespace-only text is an error everywhere.

Row files (read_rows), chosen by the file's ending:
- .jsonl / .json  one JSON object per line; blank lines are skipped. A file holding one JSON array
                  is refused with a hint: write one object per line (JSONL).
- .txt            one text per line, as {"text": line}; blank lines are skipped.
- .csv            comma-separated with a header row (Python's csv module: quoted fields may hold
                  commas and newlines). Line numbers are the physical line a row starts on. Values
                  are strings.
- .tsv            tab-separated with a header row, one row per line, no quoting (a '"' is a
                  character).
- .parquet        through the `datasets` library; "line" N in messages means row N.
- anything else that is not a local path: a Hugging Face hub data set name (its "train" split).

Training data (load_records), --mode supervised: fields query, positive, negative (also named
anchor and hard_negative; a list of negatives uses its first). --mode unsupervised: field text (a
.txt file is unsupervised data). Extra fields are ignored.

STS pairs (load_sts_pairs): JSONL with sentence1, sentence2 (non-empty strings) and score (a finite
JSON number; true/false, NaN and Infinity are refused). At least 2 pairs, and not all scores equal:
Spearman's correlation is undefined for a constant.

Retrieval (load_retrieval): a BEIR folder.
- corpus.jsonl    {"_id", "title" (optional), "text"}: a document with a title may have an empty
                  text
- queries.jsonl   {"_id", "text"}
- qrels/SPLIT.tsv query-id<TAB>corpus-id<TAB>integer score, one file per split, with an optional
                  header line "query-id<TAB>corpus-id<TAB>score"; every id must exist, and every
                  split needs at least one relevant (score > 0) document.
Ids are strings (JSON integers are read as their decimal string); an id may appear once per file.

Classification (load_classification): fields text and label (or category); a label is a string or a
JSON integer (read as a string). Either one .csv/.tsv/.jsonl file, split here per label (a seeded
20% of its rows, at least one, to test; the rest to train, so every label is on both sides: a label
with a single row is refused), or a folder with train.* and test.* files used as given. At least 2
labels. A test text that also occurs in train is dropped from test, with a warning: it would be
scored from memory (a leak), not from its embedding.
"""
import csv
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

TABLE_SUFFIXES = (".csv", ".tsv")
FORMATS = (".jsonl", ".json", ".txt", *TABLE_SUFFIXES, ".parquet")
ALIASES = {"query": ("query", "anchor"), "positive": ("positive",),
           "negative": ("negative", "hard_negative"), "text": ("text",)}


class DataError(ValueError):
    """Bad input data: a one-line message "PATH:LINE: field 'x' ...", printed by the CLIs
    (exit 2)."""


# ----------------------------------------------------------------------------- lines and rows

def read_lines(path):
    """-> [(line number, str)], every line (blank ones too), without its line end.

    Split on b"\\n" only: str.splitlines() would also split inside a text at U+2028, U+0085 or a
    form feed, making one record two. Decoding line by line lets an invalid byte name its line.
    """
    # the UTF-8 byte-order mark some editors write
    raw = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
    chunks = raw.split(b"\n")
    if chunks[-1] == b"":  # the file's last line end is not an extra empty line
        chunks.pop()
    lines = []
    for n, chunk in enumerate(chunks, 1):
        try:
            lines.append((n, chunk.removesuffix(b"\r").decode("utf-8")))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: invalid UTF-8 (byte 0x{chunk[e.start]:02x} "
                            f"at column {e.start + 1}); save the file as UTF-8") from None
    return lines


def _read_bytes(path):
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_rows(path):
    """-> [(line number, dict)] from any row format of the module docstring."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _json_rows(path)
    if suffix == ".txt":
        return [(n, {"text": s}) for n, s in read_lines(path) if s.strip()]
    if suffix in TABLE_SUFFIXES:
        return _table_rows(path, suffix)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    if p.exists() and suffix != ".parquet":
        raise DataError(f"{path}: unknown format '{suffix}' (use {', '.join(FORMATS)})")
    if not p.exists() and (suffix == ".parquet" or str(path).startswith((".", "/", "~"))):
        raise DataError(f"{path}: no such file")
    return _datasets_rows(path, p.exists())


def _json_rows(path):
    rows, first = [], True
    for n, line in read_lines(path):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            raise DataError(f"{path}: is a JSON array: write one object per line (JSONL)")
        first = False
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            spread = (": an object spread over several lines? write one per line (JSONL)"
                      if line.strip() == "{" else "")
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})"
                            f"{spread}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {_kind(row)}")
        rows.append((n, row))
    return rows


def _table_rows(path, suffix):
    """CSV or TSV, first row the header. The lines are fed back with their "\\n" so that quoted CSV
    fields keep their newlines and csv's line_num counts physical lines."""
    lines = [s + "\n" for _, s in read_lines(path)]
    # long documents exceed csv's 128 KiB default
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else {}
    reader = csv.reader(iter(lines), **kw)
    header, header_line, rows = None, None, []
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{start}: {e}") from None
        if not values or values == [""]:  # a blank line
            continue
        if header is None:
            header, header_line = _header(path, start, values), start
        elif len(values) != len(header):
            raise DataError(f"{path}:{start}: {len(values)} fields, but the header "
                            f"(line {header_line}) has {len(header)}")
        else:
            rows.append((start, dict(zip(header, values))))
    return rows


def _header(path, n, names):
    names = [s.strip() for s in names]
    dup = next((s for i, s in enumerate(names) if s in names[:i]), None)
    if dup is not None:
        raise DataError(f"{path}:{n}: column '{dup}' appears twice in the header")
    return names


def _datasets_rows(path, local):
    """Parquet files and hub names: the datasets library reads them (imported only here: it is
    slow)."""
    import datasets

    try:
        ds = (datasets.load_dataset("parquet", data_files=str(path), split="train") if local
              else datasets.load_dataset(str(path), split="train"))
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise DataError(f"{path}: cannot read ({first})") from None
    return [(i, dict(r)) for i, r in enumerate(ds, 1)]


def _kind(value):
    """A JSON value's type as a user wrote it."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value):
    """A short JSON rendering of a bad value for a message."""
    return json.dumps(value, default=str)[:40]


def text_field(path, n, row, field, names=None):
    """row's non-blank string under `field` (or one of its alias `names`), else a DataError."""
    names = names or (field,)
    where = f"{path}:{n}: field '{field}'" + "".join(f" (or '{a}')" for a in names[1:])
    value = next((row[a] for a in names if a in row), None)
    # a list of hard negatives: train on the first
    if isinstance(value, list) and field == "negative":
        if not value:
            raise DataError(f"{where} is an empty list")
        value = value[0]
    if value is None:
        raise DataError(f"{where} is missing")
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {_kind(value)}: {_show(value)}")
    if not value.strip():
        raise DataError(f"{where} is empty" if not value else f"{where} is only whitespace")
    return value


# ----------------------------------------------------------------------------- training records

def load_records(path, mode):
    """Training records: [{query, positive, negative}] (supervised) or [{text}] (unsupervised)."""
    if mode not in ("supervised", "unsupervised"):
        raise ValueError(f"mode must be supervised or unsupervised, got {mode!r}")
    if mode == "supervised" and Path(path).suffix.lower() == ".txt":
        raise DataError(f"{path}: a .txt file holds one text per line: use --mode unsupervised")
    fields = ("query", "positive", "negative") if mode == "supervised" else ("text",)
    records = [_record(path, n, row, fields) for n, row in read_rows(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _record(path, n, row, fields):
    try:
        return {f: text_field(path, n, row, f, ALIASES[f]) for f in fields}
    except DataError as e:
        # the other mode's field: a likely mix-up
        other = "text" if "query" in fields else "positive"
        if str(e).endswith("is missing") and other in row:
            mode = "unsupervised" if other == "text" else "supervised"
            raise DataError(f"{e}; the row has '{other}': use --mode {mode}") from None
        raise


# ----------------------------------------------------------------------------- STS pairs

def load_sts_pairs(path, limit=None):
    """The first `limit` (all if None) (sentence1, sentence2, float score) pairs of an STS JSONL
    file."""
    pairs = []
    for n, row in read_rows(path):
        if limit is not None and len(pairs) == limit:
            break
        s1, s2 = text_field(path, n, row, "sentence1"), text_field(path, n, row, "sentence2")
        pairs.append((s1, s2, _score(path, n, row)))
    taken = f"the first {limit} rows of " if limit is not None and len(pairs) == limit else ""
    if len(pairs) < 2:
        raise DataError(f"{path}: a Spearman correlation needs at least 2 pairs, "
                        f"found {len(pairs)}")
    if len({s for _, _, s in pairs}) == 1:
        raise DataError(f"{path}: all scores in {taken}the file equal {pairs[0][2]:g}: "
                        "Spearman's correlation is undefined for a constant")
    return pairs


def _score(path, n, row):
    value = row.get("score")
    where = f"{path}:{n}: field 'score'"
    if "score" not in row:
        raise DataError(f"{where} is missing")
    # bool is a subclass of int in Python: without this, true would be read as 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} must be a number, got {_kind(value)}: {_show(value)}")
    if not math.isfinite(value):  # json.loads accepts NaN and Infinity
        raise DataError(f"{where} must be finite, got {value}")
    return float(value)


# ----------------------------------------------------------------------------- retrieval (BEIR)

def load_retrieval(folder):
    """-> (corpus {id: (title, text)}, queries {id: text},
    qrels {split: {query id: {doc id: int}}})."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder "
                        "(expected corpus.jsonl, queries.jsonl and qrels/*.tsv)")
    corpus = _id_rows(folder / "corpus.jsonl", title=True)
    queries = {i: text for i, (_, text) in _id_rows(folder / "queries.jsonl", title=False).items()}
    files = sorted((folder / "qrels").glob("*.tsv"))
    if not files:
        raise DataError(f"{folder / 'qrels'}: no .tsv judgement files (qrels/SPLIT.tsv)")
    return corpus, queries, {f.stem: _qrels(f, queries, corpus) for f in files}


def _id_rows(path, title):
    """{_id: (title, text)} of a BEIR JSONL file; a duplicate _id names both of its lines."""
    out, lines = {}, {}
    for n, row in read_rows(path):
        i = row.get("_id")
        if isinstance(i, bool) or not isinstance(i, (str, int)) or not str(i).strip():
            raise DataError(f"{path}:{n}: field '_id' must be a non-empty string or an integer, "
                            f"got {_show(i)}")
        i = str(i)
        if i in lines:
            raise DataError(f"{path}:{n}: duplicate _id '{i}' (also on line {lines[i]})")
        t = row.get("title") if title and row.get("title") is not None else ""
        if not isinstance(t, str):
            raise DataError(f"{path}:{n}: field 'title' must be a string, got {_kind(t)}")
        # a titled document may have an empty text
        if t.strip() and isinstance(row.get("text"), str):
            text = row["text"]
        else:
            text = text_field(path, n, row, "text")
        out[i], lines[i] = (t, text), n
    return out


def _qrels(path, queries, corpus):
    qrels, header, relevant = {}, False, 0
    for n, line in read_lines(path):
        fields = line.split("\t")
        if not line.strip():
            continue
        # the optional header line
        if not qrels and not header and fields[0].strip() == "query-id":
            header = True
            continue
        if len(fields) != 3:
            raise DataError(f"{path}:{n}: expected 3 tab-separated fields query-id, corpus-id, "
                            f"score; found {len(fields)}")
        q, d, s = (x.strip() for x in fields)
        if not re.fullmatch(r"[+-]?\d+", s):
            raise DataError(f"{path}:{n}: field 'score' must be an integer, got '{s}'")
        if q not in queries:
            raise DataError(f"{path}:{n}: query-id '{q}' is not in queries.jsonl")
        if d not in corpus:
            raise DataError(f"{path}:{n}: corpus-id '{d}' is not in corpus.jsonl")
        qrels.setdefault(q, {})[d] = int(s)
        relevant += int(s) > 0
    if not qrels:
        raise DataError(f"{path}: " + ("only a header line, no judgements" if header
                                       else "no judgements"))
    if not relevant:
        raise DataError(f"{path}: no relevant document (no row with score > 0): "
                        "nothing to retrieve")
    return qrels


# ----------------------------------------------------------------------------- classification

def load_classification(path, test_fraction=0.2, seed=0):
    """-> {"train": [(text, label)], "test": [(text, label)]}: a file split here, or a train/test
    folder."""
    path = Path(path)
    if path.is_dir():
        files = {s: _split_file(path, s) for s in ("train", "test")}
        splits = {s: _labelled(f) for s, f in files.items()}
        known = {label for _, label, _ in splits["train"]}
        for _, label, n in splits["test"]:
            if label not in known:
                raise DataError(f"{files['test']}:{n}: label '{label}' never occurs in "
                                f"{files['train']}: the classifier cannot learn it")
        splits = {s: [r[:2] for r in rows] for s, rows in splits.items()}
        where = files["train"]
    else:
        rows = _labelled(path)
        counts = Counter(label for _, label, _ in rows)
        single = next((label for label, c in counts.items() if c == 1), None)
        if single is not None and len(counts) >= 2:
            n = next(n for _, lab, n in rows if lab == single)
            raise DataError(f"{path}:{n}: label '{single}' has a single row: it cannot be in both "
                            "train and test")
        splits = split_rows([r[:2] for r in rows], test_fraction, seed)
        where = path
    labels = Counter(label for _, label in splits["train"])
    if len(labels) < 2:
        raise DataError(f"{where}: classification needs at least 2 labels, found {len(labels)}: "
                        + ", ".join(f"'{k}'" for k in labels))
    return _drop_leaks(splits, path)


def _split_file(folder, split):
    found = [folder / f"{split}{s}" for s in (".csv", ".tsv", ".jsonl", ".json")
             if (folder / f"{split}{s}").exists()]
    if not found:
        raise DataError(f"{folder}: no {split}.csv, {split}.tsv, {split}.jsonl "
                        f"or {split}.json file")
    return found[0]


def _labelled(path):
    """[(text, label, line)] of one file; a label is a non-empty string or an integer, kept as a
    string."""
    rows = []
    for n, row in read_rows(path):
        text = text_field(path, n, row, "text")
        key = "label" if "label" in row else "category"
        label = row.get(key)
        where = f"{path}:{n}: field 'label' (or 'category')"
        if label is None:
            raise DataError(f"{where} is missing")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where} must be a string or an integer, "
                            f"got {_kind(label)}: {_show(label)}")
        if not str(label).strip():
            raise DataError(f"{where} is empty")
        rows.append((text, str(label), n))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def split_rows(rows, test_fraction=0.2, seed=0):
    """Per label, a seeded `test_fraction` of its rows (at least one) to test, the rest to train.

    numpy's generator, as evaluate.py has always split: the same test rows as earlier runs, so
    scores stay comparable (and mteb's result cache, keyed on the files, never mixes two splits).
    """
    import numpy as np  # imported here: train.py reads data without it

    rng = np.random.default_rng(seed)
    by_label = {}
    for i in rng.permutation(len(rows)):
        by_label.setdefault(rows[i][1], []).append(rows[i])
    train, test = [], []
    for group in by_label.values():
        k = max(1, round(test_fraction * len(group))) if len(group) > 1 else 0
        test += group[:k]
        train += group[k:]
    return {"train": train, "test": test}


def _drop_leaks(splits, path):
    """Remove test rows whose exact text is also in train: they would be classified by memory."""
    seen = {text for text, _ in splits["train"]}
    test = [r for r in splits["test"] if r[0] not in seen]
    if len(test) < len(splits["test"]):
        warnings.warn(f"{path}: dropped {len(splits['test']) - len(test)} test rows whose text "
                      "is also in train (a leak: they would score as memorised)", stacklevel=3)
    if not test:
        raise DataError(f"{path}: no test rows left after removing texts that are also in train")
    return {"train": splits["train"], "test": test}

