"""evaluate.py's plumbing around mteb: protocols, task names, local files as mteb tasks, the cache.

- PROTOCOLS:       the embedding settings of grace's protocol and of the release's evaluation;
                   embedding_settings() resolves one model's (flags > grace.json > protocol)
- RELEASE_TASKS:   the release's 55 tasks (--benchmark GRACE-release), run on split "test"
- resolve_tasks(): --tasks / --benchmark / --local -> mteb task objects (close matches for typos)
- local_task():    an STS JSONL, a BEIR folder or a classification file as an mteb task
- result_cache():  mteb's ResultCache writing to OUT/MODEL/REVISION/...; model_id() names a model
- model_meta():    the ModelMeta mteb files an encoder's results under
- evaluate_model(): one model's scores through mteb.evaluate, a line per task
- summary_table(): the text table evaluate.py prints at the end
"""
import copy
import difflib
import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import policy
from infra import data, encoder_inputs
from infra.cli import RELEASE_SYSTEM_PROMPT, UsageError

DEFAULT_MAX_LENGTH = 1024  # evaluate.py's prompt limit when a checkpoint has no grace.json
DEFAULT_MAX_NEW_TOKENS = 256  # its rationale limit then (the release: 2048)

# What each --protocol embeds with when a flag does not say (under grace, a checkpoint's grace.json
# comes first for the three it saves). release: the authors' eval.sh + eval_mteb.py (vLLM samples
# at temperature 1, top-p 1, 2048 new tokens; the chat prompt cut to 1024 tokens; the raw mean).
PROTOCOLS = {
    "grace": dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, system_prompt=policy.DEFAULT_SYSTEM_PROMPT,
                  max_length=DEFAULT_MAX_LENGTH, temperature=0.0, top_p=1.0, normalize=True),
    "release": dict(max_new_tokens=2048, system_prompt=RELEASE_SYSTEM_PROMPT, max_length=1024,
                    temperature=1.0, top_p=1.0, normalize=False),
}
GRACE_JSON_KEYS = dict(max_new_tokens="max_new_tokens", system_prompt="system_prompt",
                       max_length="max_prompt_tokens")  # setting: its key in grace.json

# The release's task list (eval.sh ALL_TASKS), by type; eval_mteb.py runs it with
# eval_splits=["test"] and every language subset. Its clustering comment says 11 tasks: 10 are
# listed (StackExchangeClusteringP2P is not). TweetSentimentClassification is the multilingual
# tweet task (8 languages), not MTEB(eng)'s TweetSentimentExtractionClassification.
RELEASE_TASKS = {
    "STS": ["BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17",
            "STSBenchmark", "STS22"],
    "Summarization": ["SummEval"],
    "Retrieval": ["ArguAna", "CQADupstackRetrieval", "FiQA2018", "NFCorpus", "SCIDOCS", "SciFact",
                  "ClimateFEVER", "DBPedia", "NQ", "FEVER", "HotpotQA", "MSMARCO",
                  "QuoraRetrieval", "TRECCOVID", "Touche2020"],
    "Reranking": ["AskUbuntuDupQuestions", "MindSmallReranking", "SciDocsRR",
                  "StackOverflowDupQuestions"],
    "Clustering": ["ArxivClusteringP2P", "ArxivClusteringS2S", "BiorxivClusteringP2P",
                   "BiorxivClusteringS2S", "MedrxivClusteringP2P", "MedrxivClusteringS2S",
                   "RedditClustering", "RedditClusteringP2P", "StackExchangeClustering",
                   "TwentyNewsgroupsClustering"],
    "PairClassification": ["SprintDuplicateQuestions", "TwitterSemEval2015", "TwitterURLCorpus"],
    "Classification": ["AmazonCounterfactualClassification", "AmazonPolarityClassification",
                       "AmazonReviewsClassification", "Banking77Classification",
                       "EmotionClassification", "ImdbClassification",
                       "ToxicConversationsClassification", "MTOPDomainClassification",
                       "MassiveIntentClassification", "MassiveScenarioClassification",
                       "MTOPIntentClassification", "TweetSentimentClassification"],
}
RELEASE_BENCHMARK = "GRACE-release"  # --benchmark's name for RELEASE_TASKS
RELEASE_SPLIT = "test"


def embedding_settings(name_or_path, protocol="grace", **given):
    """-> (settings, sources) of one model: a given value (not None) as is; else, under the grace
    protocol, the checkpoint's grace.json; else the protocol's. sources: key -> 'given',
    'grace.json', 'default' (grace's) or 'release'."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}: {' or '.join(PROTOCOLS)}")
    saved = checkpoint_settings(name_or_path) if protocol == "grace" else {}
    settings, sources = {}, {}
    for key, fallback in PROTOCOLS[protocol].items():
        saved_value = saved.get(GRACE_JSON_KEYS.get(key))
        settings[key], sources[key] = (
            (given[key], "given") if given.get(key) is not None else
            (saved_value, "grace.json") if saved_value is not None else
            (fallback, "default" if protocol == "grace" else protocol))
    return settings, sources


def checkpoint_settings(path):
    """The settings train.py saved with a checkpoint (its grace.json); {} for any other model."""
    file = Path(str(path)) / "grace.json"
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{file}: expected a JSON object")
    encoder_inputs.check_grace_json(file, settings)
    return settings


def read_texts(path):
    """Texts of a file: one per line (.txt, blank lines skipped) or a 'text' field (.jsonl/.csv);
    none may be blank."""
    texts = [data.text_field(path, n, row, "text") for n, row in data.read_rows(path)]
    if not texts:
        raise UsageError(f"{path}: no texts")
    return texts


def check_model_name(name):
    """Fail at once on a model that cannot load: a missing folder, or a hub name neither cached
    nor reachable."""
    name = str(name)
    if name in ("tiny", "tiny-lm") or os.path.isdir(name):
        return
    if name.startswith((".", "/", "~")) or os.path.exists(name):
        raise UsageError(f"model folder not found: {name}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = (" (offline: HF_HUB_OFFLINE is set)"
                   if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") else "")
        raise UsageError(f"model {name!r}: not a local folder, "
                         f"and not found on the hub{offline}: {first}") from None


def _closest(name, choices):
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; close matches: {', '.join(close)}" if close else ""


def resolve_tasks(args, say=print):
    """Task objects from --tasks, --benchmark (mteb's, or GRACE-release) and --local; unknown names
    list their close matches. GRACE-release's tasks, and every hub task under --protocol release,
    run split "test" only, as the release did: say() prints one line for each task that has none,
    naming what runs instead."""
    import mteb

    names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    tasks, listed = [_hub_task(name) for name in names], []
    if args.benchmark == RELEASE_BENCHMARK:
        listed = [_hub_task(name) for group in RELEASE_TASKS.values() for name in group]
    elif args.benchmark:
        try:
            # copies: the splits of a release run must not stick to mteb's benchmark objects
            listed = [copy.copy(t) for t in mteb.get_benchmark(args.benchmark).tasks]
        except KeyError:
            names = [b.name for b in mteb.get_benchmarks()] + [RELEASE_BENCHMARK]
            raise UsageError(f"unknown benchmark {args.benchmark!r}"
                             f"{_closest(args.benchmark, names)}") from None
    release = getattr(args, "protocol", "grace") == "release"
    for task in (tasks + listed if release else
                 listed if args.benchmark == RELEASE_BENCHMARK else []):
        note = release_split(task)
        if note:
            say(note)
    tasks += listed
    for path in args.local or []:
        task = local_task(path, args.limit, getattr(args, "corpus_limit", None))
        task.load_data()  # read and check the file now: a bad row fails before any model loads
        if getattr(task, "note", None):
            say(task.note)
        tasks.append(task)
    return tasks


def _hub_task(name):
    import mteb

    try:
        return mteb.get_task(name)
    except KeyError:
        names = [t.metadata.name for t in mteb.get_tasks(exclude_superseded=False)]
        raise UsageError(f"unknown task {name!r}{_closest(name, names)}") from None


def release_split(task):
    """Keep the split the release asked for ("test") -> None; a task without one keeps its own
    splits -> the line saying so."""
    import mteb

    splits = list(task.eval_splits)
    if RELEASE_SPLIT in splits:
        task.filter_eval_splits([RELEASE_SPLIT])
        return None
    return (f"{task.metadata.name}: the release asked for split '{RELEASE_SPLIT}', which mteb "
            f"{mteb.__version__} does not define for this task; grace runs its "
            f"{', '.join(repr(s) for s in splits)} split instead")


def result_cache(out, say=print):
    """mteb's ResultCache on OUT, in mteb's own layout (OUT/results/MODEL/REVISION/experiments/
    SETTINGS/TASK.json: mteb.ResultCache(OUT).load_results reads it), with two guards. Each file
    is written whole or not at all (a kill or a full disk mid-write leaves the old one), and a
    result that is damaged, or that scored other data than the task holds now (`revisions`: task
    name -> its data revision, a content hash for local files), is recomputed with one line."""
    import mteb

    class Cache(mteb.ResultCache):
        revisions = {}

        def load_task_result(self, task_name, model_name, *args, **kwargs):
            path = self.get_task_result_path(task_name, model_name)
            try:
                result = super().load_task_result(task_name, model_name, *args, **kwargs)
            except (OSError, ValueError, KeyError, TypeError) as e:  # JSON, pydantic errors
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                say(f"   {task_name}: the cached result {path} is damaged ({first}); "
                    "recomputing it", flush=True)
                return None
            want = self.revisions.get(task_name)
            if result is not None and want and result.dataset_revision != want:
                say(f"   {task_name}: its data changed since the cached result {path.name}; "
                    "recomputing it", flush=True)
                return None
            return result

        def save_to_cache(self, task_result, model_name, model_revision=None, **kwargs):
            # mteb writes its three files into a staging folder beside them; each is then moved
            # into place by os.replace (atomic), the result itself last
            final = self.get_task_result_path(task_result.task_name, model_name, model_revision)
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=".writing-", dir=final.parent) as tmp:
                    staging = mteb.ResultCache(tmp)
                    staged = staging.get_task_result_path(task_result.task_name, model_name,
                                                          model_revision)
                    staged.parent.mkdir(parents=True, exist_ok=True)
                    if (final.parent / "run_settings.jsonl").is_file():  # mteb merges into it
                        shutil.copy(final.parent / "run_settings.jsonl", staged.parent)
                    staging.save_to_cache(task_result, model_name, model_revision, **kwargs)
                    for name in ("model_meta.json", "run_settings.jsonl", final.name):
                        if (staged.parent / name).is_file():
                            with open(staged.parent / name, "rb") as f:
                                os.fsync(f.fileno())
                            os.replace(staged.parent / name, final.parent / name)
            except OSError as e:  # a full disk, say: the files already there stay whole
                raise UsageError(f"{final}: could not be written ({e.strerror or e}); the "
                                 "results already there are kept") from None

    return Cache(out)


def content_hash(path):
    """A short hash of the bytes of a file, or of every file in a folder (with their relative
    names): a local task's data revision, so an edit files its results apart."""
    path = Path(path)
    digest = hashlib.sha1()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        digest.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _fingerprint(files):
    # names, sizes and modification times: hashing GBs of weights would take longer than some
    # evaluations
    stats = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return hashlib.sha1(repr(stats).encode()).hexdigest()[:12]


def model_id(name, model):
    """(name, revision) mteb files results under: one revision per checkpoint, so its result cache
    never returns another checkpoint's scores. A local folder is named by its last two path
    parts."""
    path = Path(name)
    if str(name) == "tiny":
        return "grace/tiny", "tiny-seed0"
    if str(name) == "tiny-lm":  # the shipped folder: a rebuilt tiny-lm gets a new revision
        return "grace/tiny-lm", _fingerprint((policy.MODELS / "tiny-lm").iterdir())
    if path.is_dir():
        path = path.resolve()
        return f"{path.parent.name}/{path.name}", _fingerprint(path.iterdir())
    # hub: the commit, if kept
    return str(name), getattr(model.config, "_commit_hash", None) or "unknown"


# ----------------------------------------------------------------------- local files as mteb tasks

def local_task(path, limit=None, corpus_limit=None):
    """The mteb task for a local file or folder, chosen by its layout
    (STS, retrieval, classification). limit, corpus_limit: --limit, --corpus-limit."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "corpus.jsonl").exists() or (path / "queries.jsonl").exists():
            splits = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
            if not splits:
                raise UsageError(f"{path / 'qrels'}: no .tsv judgement files (qrels/SPLIT.tsv)")
            return _local(LocalRetrieval, "Retrieval", path, splits, "ndcg_at_10", limit,
                          corpus_limit)
        return _local(LocalClassification, "Classification", path, ["test"], "accuracy", limit)
    rows = data.read_rows(path)
    keys = set(rows[0][1]) if rows else set()
    if {"sentence1", "sentence2"} <= keys:
        return _local(LocalSTS, "STS", path, ["test"], "cosine_spearman", limit)
    if "text" in keys and keys & {"label", "category"}:
        return _local(LocalClassification, "Classification", path, ["test"], "accuracy", limit)
    raise UsageError(f"{path}:{rows[0][0] if rows else 1}: expected fields sentence1, sentence2, "
                     "score (STS) or text, label (classification); "
                     f"found {', '.join(sorted(keys)) or 'none'}")


def _local(kind, type_name, path, splits, main_score, limit, corpus_limit=None):
    """An instance of a fresh subclass of `kind` for this file: mteb's unload_data drops an
    instance's own metadata, so the metadata must live on the class. --limit N (and a retrieval
    task's --corpus-limit M) are in the name: results apart."""
    from mteb.abstasks.task_metadata import TaskMetadata

    name = f"Local{type_name}_{path.stem}" + (f"_first{limit}" if limit else "")
    if corpus_limit is not None and type_name == "Retrieval":
        name += f"_docs{corpus_limit}" if corpus_limit else "_alldocs"
    metadata = TaskMetadata(
        name=name, type=type_name, main_score=main_score, eval_splits=splits,
        description=f"Local {type_name} task read from {path}", reference=None,
        eval_langs=["eng-Latn"],
        dataset={"path": str(path.resolve()),
                 "revision": content_hash(path)},  # an edit: a new revision, results apart
        category="t2t", modalities=["text"], bibtex_citation="")
    return type(name, (kind, _mteb_base(type_name)),
                {"metadata": metadata, "path": path, "limit": limit,
                 "corpus_limit": corpus_limit, "note": None})()


def _mteb_base(type_name):
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    return {"STS": AbsTaskSTS, "Retrieval": AbsTaskRetrieval,
            "Classification": AbsTaskClassification}[type_name]


class LocalSTS:
    """JSONL with sentence1, sentence2, score (data.load_sts_pairs): every pair is a test pair."""

    def load_data(self, num_proc=None, **kwargs):
        from datasets import Dataset, DatasetDict

        pairs = data.load_sts_pairs(self.path, limit=self.limit)
        scores = [s for _, _, s in pairs]
        self.min_score, self.max_score = min(scores), max(scores)
        self.dataset = DatasetDict(test=Dataset.from_dict({
            "sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs],
            "score": scores}))
        self.data_loaded = True


class LocalRetrieval:
    """BEIR folder (data.load_retrieval): each qrels/SPLIT.tsv is a split; its queries are those it
    judges. --limit N / --corpus-limit M: retrieval_slice. `note`: the line saying what was kept
    (None: all of it)."""

    def load_data(self, num_proc=None, **kwargs):
        if self.data_loaded:  # resolve_tasks read it already
            return
        from datasets import Dataset
        from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

        corpus, queries, qrels = data.load_retrieval(self.path)
        self.dataset, notes = {"default": {}}, []
        for split in self.metadata.eval_splits:
            judged, docs, counts = retrieval_slice(qrels[split], list(corpus), self.limit,
                                                   self.corpus_limit)
            self.dataset["default"][split] = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": queries[q]} for q in judged]),
                corpus=Dataset.from_list([{"id": i, "title": corpus[i][0], "text": corpus[i][1]}
                                          for i in docs]),
                relevant_docs=judged, top_ranked=None)
            if counts["other"] < counts["others"] or len(judged) < len(qrels[split]):
                notes.append(f"split {split}: {len(judged)} of {len(qrels[split])} queries, "
                             f"their {counts['judged']} judged documents and "
                             f"{counts['other']} of the {counts['others']} others "
                             f"(a sample, seed {SLICE_SEED})")
        self.note = f"{self.metadata.name}: " + "; ".join(notes) if notes else None
        self.data_loaded = True


SLICE_SEED = 0  # the other documents a --limit run keeps: the same ones every run
# --corpus-limit's default: this many others per judged document. 1, not 10: tiny-lm writes ~225
# tokens for a SciFact abstract (0.33 s of one core each), so --limit 50 with 10 per judged one
# takes minutes, with 1 well under one
CORPUS_PER_JUDGED = 1


def retrieval_slice(qrels, doc_ids, limit=None, corpus_limit=None, seed=SLICE_SEED):
    """What a smoke run searches: the first `limit` judged queries (all: None), every document
    judged for them, and a seeded sample of `corpus_limit` other documents (None: as many as the
    judged ones with a limit, all without; 0: all). qrels {query: {doc: score}}, doc_ids in
    corpus order -> (kept qrels, kept doc ids in corpus order, counts: judged, other, others)."""
    kept = dict(list(qrels.items())[:limit] if limit else qrels)
    judged = {d for docs in kept.values() for d in docs}
    others = [d for d in doc_ids if d not in judged]
    if corpus_limit is None:
        corpus_limit = CORPUS_PER_JUDGED * len(judged) if limit else 0
    sample = set(random.Random(seed).sample(others, min(corpus_limit, len(others)))
                 if corpus_limit else others)
    docs = [d for d in doc_ids if d in judged or d in sample]
    return kept, docs, dict(judged=len(judged), other=len(sample), others=len(others))


class LocalClassification:
    """text + label (or category), one file split here or a train/test folder
    (data.load_classification); mteb's logistic regression on the embeddings. --limit N keeps the
    first N rows of each split."""

    def load_data(self, num_proc=None, **kwargs):
        from datasets import Dataset, DatasetDict

        splits = data.load_classification(self.path)
        # the first rows of each label in turn, so that a file sorted by label keeps them all
        if self.limit:
            by_label = {}
            for row in [r for rows in splits.values() for r in rows]:
                by_label.setdefault(row[1], [])
            splits = {s: [r for group in itertools.zip_longest(*[[r for r in rows if r[1] == k]
                                                                 for k in by_label])
                          for r in group if r][:self.limit] for s, rows in splits.items()}
            if len({label for _, label in splits["train"]}) < 2:
                raise UsageError(f"{self.path}: --limit {self.limit} leaves a single label to "
                                 "train on; raise it")
        ids = {name: i for i, name in
               enumerate(sorted({label for rows in splits.values() for _, label in rows}))}
        self.dataset = DatasetDict({  # sklearn wants labels; ints keep mteb's statistics happy
            split: Dataset.from_dict({"text": [t for t, _ in rows],
                                      "label": [ids[label] for _, label in rows]})
            for split, rows in splits.items()})
        self.data_loaded = True


def result_key(encoder):
    """The settings that change an encoder's scores: its results' experiment_kwargs, so mteb
    files each combination apart (the SETTINGS folder). Those that cannot change a score are left
    out, so equal runs share results: without a rationale the decoding; greedy, the seed, top-p
    and the batch size (a text's rationale is then independent of its batch). The model's files
    are its revision (model_id), a task's data its dataset revision (content_hash)."""
    s = encoder.settings
    key = dict(rationale=s["rationale"], instructions=encoder.instructions,
               max_length=s["max_length"], normalize=s["normalize"],
               # a short hash: names become folders
               system_prompt=hashlib.sha1(encoder.system_prompt.encode()).hexdigest()[:10])
    if s["rationale"]:
        key.update(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"])
        if s["temperature"] > 0:  # sampled: one generator draws across the batches in turn
            key.update(top_p=s["top_p"], seed=s["seed"], batch_size=s["batch_size"])
    dtype = next(encoder.model.parameters()).dtype
    if dtype != torch.float32:  # bf16 on GPU scores a little differently
        key["dtype"] = str(dtype).removeprefix("torch.")
    return key


def describe(s, src, prompt):
    """One line: the settings `s` that shape the embeddings, where each came from (`src`), and
    the system prompt."""
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    decoding = "given" if "given" in (src["temperature"], src["top_p"]) else src["temperature"]
    how = "greedy" if s["temperature"] == 0 else \
        f"temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}"
    rationale = f"rationale <= {s['max_new_tokens']} tokens ({src['max_new_tokens']}), " \
        f"{how} ({decoding})" if s["rationale"] else "no rationale"
    pooling = "L2-normalised mean" if s["normalize"] else "raw mean, not normalised"
    return (f"{rationale}; prompt <= {s['max_length']} tokens ({src['max_length']}); "
            f"{pooling} ({src['normalize']}); system prompt ({src['system_prompt']}): "
            f"{prompt!r}")


def model_meta(encoder):
    """mteb's ModelMeta for a GraceEncoder: its name, revision and result_key."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    s, model = encoder.settings, encoder.model
    experiment = result_key(encoder)
    name, rev = model_id(encoder.name_or_path, model)
    return ModelMeta.create_empty(dict(
        name=name, revision=encoder.revision or rev,
        # the enum: a plain string fails at scoring time
        similarity_fn_name=ScoringFunction.COSINE,
        embed_dim=model.config.hidden_size,
        n_parameters=sum(p.numel() for p in model.parameters()),
        max_tokens=s["max_length"], framework=["PyTorch"], use_instructions=encoder.instructions,
        open_weights=True, experiment_kwargs=experiment))


def evaluate_model(encoder, tasks, cache, batch_size, overwrite="only-missing", say=print):
    """{task name: main score} through mteb.evaluate, one task at a time: a line as each ends. The
    score is the mean over the task's chosen splits and subsets (a cached file may hold more)."""
    import mteb
    from datasets.exceptions import DatasetNotFoundError

    scores = {}
    for task in tasks:
        name, before, start = task.metadata.name, dict(encoder.stats), time.perf_counter()
        if cache is not None:  # a cached result of other data is recomputed
            cache.revisions[name] = task.metadata.revision
        try:
            result = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy=overwrite,
                                   # mteb's retrieval search bar reads encode_kwargs'
                                   encode_kwargs={"batch_size": batch_size,
                                                  "show_progress_bar": False},
                                   show_progress_bar=False)
        except (ConnectionError, DatasetNotFoundError) as e:  # offline, or a hub hiccup
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"task {name}: its data set could not be downloaded ({first}); "
                             "evaluate your own files offline with --local FILE_OR_DIR") from None
        scores[name] = result.task_results[0].get_score(splits=list(task.eval_splits))
        n = encoder.stats["texts"] - before["texts"]
        if encoder.stats["calls"] == before["calls"]:
            note = "(cached)"
        elif not encoder.settings["rationale"]:
            note = f"{n} texts, no rationale"
        else:
            tokens, empty = (encoder.stats[k] - before[k] for k in ("tokens", "empty"))
            note = (f"{n} texts, rationale {tokens / max(n, 1):.1f} tokens, "
                    f"{100 * empty / max(n, 1):.0f}% empty")
        say(f"   {name:<32} {100 * scores[name]:7.2f}  {time.perf_counter() - start:7.1f}s  {note}",
            flush=True)
    return scores


def summary_table(columns, types, stats=None, perplexities=None):
    """Text table: task, type, one score column per model (x100), their difference; averages per
    type; then per model the mean rationale length, the share of empty rationales and the
    perplexity."""
    labels, rows = list(columns), list(next(iter(columns.values())))
    groups = [(f"average {k} ({sum(types[r] == k for r in rows)})",
               [r for r in rows if types[r] == k])
              for k in sorted(set(types.values()))] + [(f"average, all ({len(rows)})", rows)]
    width = max(len(name)
                for name in rows + [title for title, _ in groups] + ["empty rationales (%)"])
    cw = max(len(m) for m in labels) + 2  # score column width

    def line(name, kind, values, scale=100):  # None: not measured (a cached result)
        s = f"{name:<{width}}  {kind:<18}" + "".join(f"{'-':>{cw}}" if v is None
                                                     else f"{scale * v:>{cw}.2f}"
                                                     for v in values)
        return s + (f"{scale * (values[0] - values[1]):>+10.2f}"
                    if len(values) == 2 and None not in values else "")

    head = f"{'task':<{width}}  {'type':<18}" + "".join(f"{m:>{cw}}" for m in labels)
    head += f"{'diff':>10}" if len(labels) == 2 else ""
    rule = "-" * len(head)
    body = [line(r, types[r], [columns[m][r] for m in labels]) for r in rows]
    means = [line(title, "", [np.mean([columns[m][r] for r in members]) for m in labels])
             for title, members in groups]
    extra = []
    if stats and any(stats[m]["texts"] for m in labels):  # all cached: nothing generated this run
        share = lambda m, key: (stats[m][key] / stats[m]["texts"]  # noqa: E731
                                if stats[m]["texts"] and stats[m].get("rationale", True) else None)
        extra += [line("rationale tokens (mean)", "", [share(m, "tokens") for m in labels], 1),
                  line("empty rationales (%)", "", [share(m, "empty") for m in labels])]
    if perplexities:
        extra.append(line("perplexity", "", [perplexities[m] for m in labels], 1))
    return "\n".join([head, rule, *body, rule, *means] + ([rule, *extra] if extra else []))


