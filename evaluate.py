"""Evaluate a GRACE policy as a text encoder, through mteb's own API (tasks, metrics, results, cache).

For every text: system prompt + text -> a rationale from rollout.sample (greedy by default) -> the mean of
the last hidden states over text + rationale (policy.embed), L2-normalised. --no-rationale pools the
prompt alone: the base-model baseline.

- encode_texts():   the core, without mteb: texts -> (N, H) float32 numpy, in length-sorted batches
- GraceEncoder:     mteb's encoder protocol around it (model meta, cosine similarity, torchrun split)
- local_task():     the user's own files as mteb tasks: STS JSONL, BEIR folder, classification CSV/JSONL
- main():           the CLI: mteb tasks / benchmarks / local files -> summary table; --explain

    python evaluate.py --model out/step-500 --baseline Qwen/Qwen2.5-1.5B-Instruct --tasks STSBenchmark,SciFact
    python evaluate.py --local ../shared/data/stsbenchmark/dev.jsonl --max-new-tokens 16
    python evaluate.py --explain "A man plays a guitar." --corpus sentences.txt
"""
import argparse
import csv
import difflib
import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import mteb
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetNotFoundError
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.similarity_functions import cos_sim, pairwise_cos_sim

import policy
import rollout


class UsageError(Exception):
    """Bad input from the user: main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------- encoding (no mteb)

@torch.no_grad()
def encode_batch(model, tokenizer, texts, *, max_new_tokens, temperature=0.0, top_p=1.0, rationale=True,
                 system_prompt=policy.DEFAULT_SYSTEM_PROMPT, max_length=1024, generator=None):
    """-> (B, H) float32 tensor, rationales (list of str; "" without rationale) for one batch."""
    device = next(model.parameters()).device
    ids, mask, pool_start = policy.build_prompts(tokenizer, texts, system_prompt, max_length)
    ids, mask = ids.to(device), mask.to(device)
    if not rationale:
        return policy.embed(model, ids, mask, policy.pool_mask_from(mask, pool_start)), [""] * len(texts)
    with policy.autocast(device):  # an fp32 model on GPU samples in bf16, as policy.embed pools in bf16
        out = rollout.sample(model, ids, mask, max_new_tokens, temperature=temperature, top_p=top_p,
                             eos_token_id=policy.stop_token_ids(model, tokenizer),
                             pad_token_id=tokenizer.pad_token_id, generator=generator)
    # The prompt keeps its positions in the rollout, so pool_start still marks where the text begins.
    pool_mask = policy.pool_mask_from(out.attention_mask, pool_start)
    emb = policy.embed(model, out.sequences, out.attention_mask, pool_mask)
    rationales = [tokenizer.decode(seq[m.bool()], skip_special_tokens=True)
                  for seq, m in zip(out.sequences, out.completion_mask)]
    return emb, rationales


def encode_texts(model, tokenizer, texts, *, batch_size=16, max_new_tokens=256, temperature=0.0, top_p=1.0,
                 rationale=True, system_prompt=policy.DEFAULT_SYSTEM_PROMPT, max_length=1024, seed=0,
                 sort=True, return_rationales=False):
    """(N, H) float32 numpy embeddings of `texts`, in their order [, and the rationales].

    sort=True batches texts of similar token length together (longest first, so an out-of-memory
    shows at once), which keeps left padding and the rollout's ragged tails small. Results are put
    back in the input order. Greedy decoding makes a text's embedding independent of its batch.
    """
    texts = [str(t) for t in texts]
    if not texts:
        empty = np.zeros((0, model.config.hidden_size), dtype=np.float32)
        return (empty, []) if return_rationales else empty
    order = list(range(len(texts)))
    if sort:
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # sampled eval is reproducible
    chunks, rationales = [], [None] * len(texts)
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        emb, rats = encode_batch(model, tokenizer, [texts[i] for i in idx], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, rationale=rationale,
                                 system_prompt=system_prompt, max_length=max_length, generator=generator)
        chunks.append(emb.float().cpu().numpy())
        for i, r in zip(idx, rats):
            rationales[i] = r
    out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(chunks)
    return (out, rationales) if return_rationales else out


# ----------------------------------------------------------------------------- mteb encoder

def _dist():
    """(rank, world size): torchrun's process group if one is up, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _fingerprint(files):
    # names, sizes and modification times: hashing GBs of weights would take longer than some evaluations
    stats = sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return hashlib.sha1(repr(stats).encode()).hexdigest()[:12]


def model_id(name, model):
    """(name, revision) mteb files results under: one revision per checkpoint, so its result cache never
    returns another checkpoint's scores. A local folder is named by its last two path parts."""
    path = Path(name)
    if str(name) == "tiny":
        return "grace/tiny", "tiny-seed0"
    if path.is_dir():
        path = path.resolve()
        return f"{path.parent.name}/{path.name}", _fingerprint(path.iterdir())
    return str(name), getattr(model.config, "_commit_hash", None) or "unknown"  # hub: the commit, if kept


class GraceEncoder:
    """mteb 2.x encoder: a rationale per text, then the pooled embedding (see encode_texts).

    instructions=True appends mteb's task instruction (by prompt type: query vs document) to the
    system prompt, so it steers the rationale while staying out of the pooled tokens.
    """

    def __init__(self, model_name_or_path="tiny", revision=None, *, max_new_tokens=256, batch_size=16,
                 temperature=0.0, top_p=1.0, device=None, rationale=True, seed=0, instructions=False,
                 system_prompt=policy.DEFAULT_SYSTEM_PROMPT, max_length=1024, model=None, tokenizer=None):
        if device is None:  # under torchrun, each rank its own GPU
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        if model is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else None  # bf16 on GPU, fp32 on CPU
            model, tokenizer = policy.load(model_name_or_path, device=device, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        try:  # the template alone must fit max_length: fail now, not in the middle of a task
            policy.build_prompts(tokenizer, ["x"], system_prompt, max_length)
        except ValueError as e:
            raise UsageError(f"--max-length {max_length}: {e}") from e
        self.settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, rationale=rationale, max_length=max_length, seed=seed)
        self.system_prompt, self.instructions = system_prompt, instructions
        # Settings that change the embeddings go into experiment_kwargs: mteb files results under them.
        experiment = dict(rationale=rationale, instructions=instructions, seed=seed,
                          **({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
                             if rationale else {}))
        if max_length != 1024:  # these two only when changed, so default runs keep their result folder
            experiment["max_length"] = max_length
        if system_prompt != policy.DEFAULT_SYSTEM_PROMPT:  # a short hash: the name becomes a folder name
            experiment["system_prompt"] = hashlib.sha1(system_prompt.encode()).hexdigest()[:10]
        name, rev = model_id(model_name_or_path, model)
        self.mteb_model_meta = ModelMeta.create_empty(dict(
            name=name, revision=revision or rev,
            similarity_fn_name=ScoringFunction.COSINE,  # the enum: a plain string fails at scoring time
            embed_dim=model.config.hidden_size, n_parameters=sum(p.numel() for p in model.parameters()),
            max_tokens=max_length, framework=["PyTorch"], use_instructions=instructions, open_weights=True,
            experiment_kwargs=experiment))

    def system_prompt_for(self, task_metadata, prompt_type):
        instruction = task_metadata.prompt if self.instructions and task_metadata is not None else None
        if isinstance(instruction, dict):
            instruction = instruction.get(getattr(prompt_type, "value", prompt_type))
        elif getattr(prompt_type, "value", prompt_type) == "document":
            instruction = None  # a single task instruction describes the query side, as in mteb
        return f"{self.system_prompt}\nTask: {instruction}" if instruction else self.system_prompt

    def encode_texts(self, texts, system_prompt=None, return_rationales=False):
        kw = dict(self.settings, system_prompt=system_prompt or self.system_prompt)
        return encode_texts(self.model, self.tokenizer, texts, return_rationales=return_rationales, **kw)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        system_prompt = self.system_prompt_for(task_metadata, prompt_type)
        rank, world = _dist()
        if world == 1:
            return self.encode_texts(texts, system_prompt)
        # torchrun: every rank runs the same mteb task; each embeds every world-th text, all gather.
        parts = [None] * world
        torch.distributed.all_gather_object(parts, self.encode_texts(texts[rank::world], system_prompt))
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for r, part in enumerate(parts):
            out[r::world] = part
        return out

    def similarity(self, embeddings1, embeddings2):
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return pairwise_cos_sim(embeddings1, embeddings2)


# ----------------------------------------------------------------------------- local files as mteb tasks

def read_records(path, fields=(), plain=False):
    """Yield (line number, dict) from a JSONL or CSV file (str lines if plain); errors name file and line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                rows = ((reader.line_num, row) for row in reader)
            else:
                rows = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for n, row in rows:
                if plain:
                    yield n, row
                    continue
                if isinstance(row, str):
                    try:
                        row = json.loads(row)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                for field in fields:
                    if not isinstance(row, dict) or row.get(field) in (None, ""):
                        raise UsageError(f"{path}, line {n}: missing field '{field}'")
                yield n, row
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _local(base, kind, path, splits, main_score):
    """An instance of a fresh subclass of `base` for this file: mteb's unload_data drops an instance's
    own metadata, so the metadata must live on the class."""
    path = Path(path)
    metadata = TaskMetadata(
        name=f"Local{kind}_{path.stem}", type=kind, main_score=main_score, eval_splits=splits,
        description=f"Local {kind} task read from {path}", reference=None, eval_langs=["eng-Latn"],
        dataset={"path": str(path.resolve()), "revision": _fingerprint([path, *path.rglob("*")])},  # edit: new rev
        category="t2t", modalities=["text"], bibtex_citation="")
    return type(metadata.name, (base,), {"metadata": metadata, "path": path})()


class LocalSTS(AbsTaskSTS):
    """JSONL with sentence1, sentence2, score: every line is a test pair."""

    def load_data(self, num_proc=None, **kwargs):
        rows = [(n, r) for n, r in read_records(self.path, ("sentence1", "sentence2", "score"))]
        scores = []
        for n, r in rows:
            try:
                scores.append(float(r["score"]))
            except (TypeError, ValueError):
                raise UsageError(f"{self.path}, line {n}: field 'score' is not a number") from None
        self.min_score, self.max_score = min(scores), max(max(scores), min(scores) + 1)
        self.dataset = DatasetDict(test=Dataset.from_dict({
            "sentence1": [str(r["sentence1"]) for _, r in rows],
            "sentence2": [str(r["sentence2"]) for _, r in rows], "score": scores}))
        self.data_loaded = True


class LocalRetrieval(AbsTaskRetrieval):
    """BEIR folder: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels/SPLIT.tsv.

    Each qrels file is a split; its queries are those it judges (queries.jsonl may hold more).
    """

    def load_data(self, num_proc=None, **kwargs):
        corpus = Dataset.from_list([{"id": str(r["_id"]), "title": str(r.get("title") or ""), "text": str(r["text"])}
                                    for _, r in read_records(self.path / "corpus.jsonl", ("_id", "text"))])
        queries = {str(r["_id"]): str(r["text"]) for _, r in read_records(self.path / "queries.jsonl", ("_id", "text"))}
        self.dataset = {"default": {}}
        for split in self.metadata.eval_splits:
            qrels = self._read_qrels(self.path / "qrels" / f"{split}.tsv", queries)
            self.dataset["default"][split] = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": queries[q]} for q in qrels]),
                corpus=corpus, relevant_docs=qrels, top_ranked=None)
        self.data_loaded = True

    @staticmethod
    def _read_qrels(path, queries):
        qrels = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            q, *rest = line.split("\t")
            if not line.strip() or (n == 1 and q == "query-id"):
                continue  # blank line or the header
            if len(rest) != 2 or not rest[1].strip().lstrip("-").isdigit():
                raise UsageError(f"{path}, line {n}: expected query-id<TAB>corpus-id<TAB>integer score")
            if q not in queries:
                raise UsageError(f"{path}, line {n}: query-id '{q}' is not in queries.jsonl")
            qrels.setdefault(q, {})[rest[0]] = int(rest[1])
        return qrels


class LocalClassification(AbsTaskClassification):
    """text + label (or category) columns, CSV or JSONL; mteb's logistic regression on the embeddings.

    A folder with train.* and test.* files uses them as given. A single file is split here: per label,
    a seeded 20% of its rows (at least one, when it has two or more) is the test split, the rest train,
    so every label is seen on both sides. mteb then trains on 8 samples per label, 10 times.
    """

    def load_data(self, num_proc=None, **kwargs):
        if self.path.is_dir():
            splits = {s: self._rows(_split_file(self.path, s)) for s in ("train", "test")}
        else:
            splits = _split_rows(self._rows(self.path))
        names = sorted({label for rows in splits.values() for _, label in rows})
        ids = {name: i for i, name in enumerate(names)}  # sklearn wants labels; ints keep mteb's stats happy
        self.dataset = DatasetDict({
            split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [ids[label] for _, label in rows]})
            for split, rows in splits.items()})
        self.data_loaded = True

    @staticmethod
    def _rows(path):
        records = list(read_records(path, ("text",)))
        if not records:
            raise UsageError(f"{path}: no rows")
        key = "label" if "label" in records[0][1] else "category"
        for n, r in records:
            if r.get(key) in (None, ""):
                raise UsageError(f"{path}, line {n}: missing field 'label' (or 'category')")
        return [(str(r["text"]), str(r[key])) for _, r in records]


def _split_file(folder, split):
    found = [p for p in (folder / f"{split}.csv", folder / f"{split}.jsonl") if p.exists()]
    return found[0] if found else None


def _split_rows(rows, test_fraction=0.2, seed=0):
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


def local_task(path):
    """The mteb task for a local file or folder, chosen by its layout and fields."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "corpus.jsonl").exists() and (path / "queries.jsonl").exists():
            splits = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
            if not splits:
                raise UsageError(f"{path / 'qrels'}: no .tsv judgement files")
            return _local(LocalRetrieval, "Retrieval", path, splits, "ndcg_at_10")
        if _split_file(path, "train") and _split_file(path, "test"):
            return _local(LocalClassification, "Classification", path, ["test"], "accuracy")
        raise UsageError(f"{path}: expected corpus.jsonl + queries.jsonl + qrels/*.tsv (retrieval) "
                         "or train and test .csv/.jsonl files (classification)")
    first = next(read_records(path), None)
    if first is None:
        raise UsageError(f"{path}: no rows")
    keys = set(first[1]) if isinstance(first[1], dict) else set()
    if {"sentence1", "sentence2", "score"} <= keys:
        return _local(LocalSTS, "STS", path, ["test"], "cosine_spearman")
    if "text" in keys and keys & {"label", "category"}:
        return _local(LocalClassification, "Classification", path, ["test"], "accuracy")
    raise UsageError(f"{path}, line 1: expected fields sentence1, sentence2, score (STS) or text, label "
                     f"(classification); found {', '.join(sorted(keys)) or 'none'}")


# ----------------------------------------------------------------------------- CLI

def _closest(name, choices):
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; close matches: {', '.join(close)}" if close else ""


def resolve_tasks(args):
    """Task objects from --tasks, --benchmark and --local; unknown names list their close matches."""
    tasks = []
    for name in [t.strip() for t in (args.tasks or "").split(",") if t.strip()]:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError:
            names = [t.metadata.name for t in mteb.get_tasks(exclude_superseded=False)]
            raise UsageError(f"unknown task {name!r}{_closest(name, names)}") from None
    if args.benchmark:
        try:
            tasks.extend(mteb.get_benchmark(args.benchmark).tasks)
        except KeyError:
            names = [b.name for b in mteb.get_benchmarks()]
            raise UsageError(f"unknown benchmark {args.benchmark!r}{_closest(args.benchmark, names)}") from None
    tasks.extend(local_task(p) for p in args.local or [])
    if not tasks:
        raise UsageError("nothing to evaluate: give --tasks, --benchmark, --local or --explain")
    return tasks


def evaluate_model(encoder, tasks, cache, batch_size):
    """{task name: main score} through mteb.evaluate, one task at a time (so a failure names its task)."""
    scores = {}
    for task in tasks:
        name = task.metadata.name
        try:
            result = mteb.evaluate(encoder, task, cache=cache, encode_kwargs={"batch_size": batch_size},
                                   show_progress_bar=False)
        except (ConnectionError, DatasetNotFoundError) as e:  # offline, or a hub hiccup
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"task {name}: its data set could not be downloaded ({first}); "
                             "evaluate your own files offline with --local FILE_OR_DIR") from None
        scores[name] = result.task_results[0].get_score()
    return scores


def summary_table(columns, types):
    """Text table: task, type, one score column per model (x100), their difference; averages per type."""
    labels, rows = list(columns), list(next(iter(columns.values())))
    groups = [(f"average {k} ({sum(types[r] == k for r in rows)})", [r for r in rows if types[r] == k])
              for k in sorted(set(types.values()))] + [(f"average, all ({len(rows)})", rows)]
    width = max(len(name) for name in rows + [title for title, _ in groups])
    cw = max(len(m) for m in labels) + 2  # score column width

    def line(name, kind, values):
        s = f"{name:<{width}}  {kind:<18}" + "".join(f"{100 * v:>{cw}.2f}" for v in values)
        return s + (f"{100 * (values[0] - values[1]):>+10.2f}" if len(values) == 2 else "")

    head = f"{'task':<{width}}  {'type':<18}" + "".join(f"{m:>{cw}}" for m in labels)
    head += f"{'diff':>10}" if len(labels) == 2 else ""
    rule = "-" * len(head)
    body = [line(r, types[r], [columns[m][r] for m in labels]) for r in rows]
    means = [line(title, "", [np.mean([columns[m][r] for r in members]) for m in labels]) for title, members in groups]
    return "\n".join([head, rule, *body, rule, *means])


def explain(encoder, texts, corpus=None, top_k=3):
    """Print the rationale for each text; with a corpus, its nearest texts and their rationales."""
    emb, rats = encoder.encode_texts(texts, return_rationales=True)
    if corpus:
        if Path(corpus).suffix.lower() in (".jsonl", ".csv"):
            docs = [str(r["text"]) for _, r in read_records(corpus, ("text",))]
        else:  # plain text, one per line: read_records' error handling without its JSON parsing
            docs = [line.strip() for _, line in read_records(corpus, plain=True) if line.strip()]
        doc_emb, doc_rats = encoder.encode_texts(docs, return_rationales=True)
    for i, text in enumerate(texts):
        print(f"=== text: {text}\n--- rationale: {rats[i]}")
        if corpus:
            sims = doc_emb @ emb[i]
            for j in np.argsort(-sims)[:top_k]:
                print(f"  [{sims[j]:.3f}] {docs[j]}\n          rationale: {doc_rats[j]}")
        print()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MTEB scores of a GRACE policy (rationale + mean pooling).")
    p.add_argument("--model", action="append", help="model folder, hub name or 'tiny' (default); twice = compare")
    p.add_argument("--baseline", help="a second model, evaluated the same way and shown side by side")
    p.add_argument("--tasks", help="comma-separated mteb task names, e.g. STSBenchmark,SciFact")
    p.add_argument("--benchmark", help="an mteb benchmark name, e.g. 'MTEB(eng, v1)' (the classic English MTEB)")
    p.add_argument("--local", "--local-files", action="append", metavar="FILE_OR_DIR",  # torchrun takes --local
                   help="STS .jsonl | BEIR retrieval folder | classification .csv/.jsonl or train+test folder")
    p.add_argument("--out", help="folder for mteb's result JSONs (a result cache: reruns skip finished tasks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256, help="rationale length cap (the release: 2048)")
    p.add_argument("--max-length", type=int, default=1024, help="prompt length cap in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; the release samples at 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--no-rationale", action="store_true", help="pool the prompt alone: the base-model baseline")
    p.add_argument("--instructions", action="store_true", help="add mteb's task instruction to the system prompt")
    p.add_argument("--device", help="default: cuda if available (bf16), else cpu")
    p.add_argument("--explain", nargs="+", metavar="TEXT", help="print the rationale written for each text")
    p.add_argument("--corpus", help="with --explain: texts (one per line, or JSONL/CSV with text) to search")
    p.add_argument("--top-k", type=int, default=3)
    args = p.parse_args(argv)
    for k, low in dict(batch_size=1, max_new_tokens=0, max_length=1, top_k=1, temperature=0).items():
        if getattr(args, k) < low:
            p.error(f"--{k.replace('_', '-')} must be at least {low}, got {getattr(args, k)}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    args.model = (args.model or ["tiny"]) + ([args.baseline] if args.baseline else [])
    return args


def run(args):
    rank, world = _dist()
    enc_kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                      top_p=args.top_p, device=args.device, rationale=not args.no_rationale, seed=args.seed,
                      instructions=args.instructions, max_length=args.max_length)
    if args.explain:
        explain(GraceEncoder(args.model[0], **enc_kwargs), args.explain, args.corpus, args.top_k)
        return 0
    tasks = resolve_tasks(args)  # before loading any model: a typo should fail in seconds
    cache = mteb.ResultCache(cache_path=args.out) if args.out and rank == 0 else None
    columns = {}
    for name in args.model:
        encoder = GraceEncoder(name, **enc_kwargs)
        label = encoder.mteb_model_meta.name
        columns[label if label not in columns else f"{label} ({len(columns) + 1})"] = \
            evaluate_model(encoder, tasks, cache, args.batch_size)
        del encoder  # one model in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if rank == 0:
        print(summary_table(columns, {t.metadata.name: t.metadata.type for t in tasks}))
        if args.out:
            print(f"mteb result JSONs in {Path(args.out) / 'results'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return run(args)
    except (UsageError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
