"""Evaluate a GRACE policy as a text encoder: in Python, and through mteb's own API (tasks, metrics, results).

The embedding of a text is policy.encode's, the one definition training uses too: system prompt + text ->
a rationale written by the model (greedy by default) -> the L2-normalised mean of the last hidden states
over text + rationale. --no-rationale pools the prompt alone: the base-model baseline.

- encode_texts():  texts -> (N, H) float32 numpy, in length-sorted batches of policy.encode, input order kept
- GraceEncoder:    sentence-transformers-shaped `encode(list of str)`, and mteb's encoder protocol when
                   given mteb's DataLoader (model meta, cosine similarity, torchrun split)
- perplexity():    the model's language-model perplexity on plain texts: does it stay generative?
- main():          the CLI: mteb tasks / benchmarks / local files -> per-task lines, summary table; --explain

    from evaluate import GraceEncoder
    emb = GraceEncoder("out/final").encode(["a text", "another"])   # (2, H) float32, L2-normalised

    python evaluate.py --model out/step-500 --baseline Qwen/Qwen2.5-1.5B-Instruct --tasks STSBenchmark,SciFact
    python evaluate.py --model out/final --local data/stsbenchmark/dev.jsonl --limit 100   # a smoke run
    python evaluate.py --model out/final --explain "A man plays a guitar." --corpus sentences.txt
    python evaluate.py --model out/final --baseline Qwen/Qwen2.5-1.5B-Instruct --perplexity held_out.txt

A checkpoint's grace.json (written by train.py) sets the default rationale length and system prompt.
Results are mteb's JSONs under --out (results/): MODEL/REVISION/experiments/SETTINGS/TASK.json; a rerun
reuses them ("(cached)") unless --recompute. A checkpoint folder is not a sentence-transformers model:
plain pooling without the rationale gives other vectors (checkpoint.st_guard_files makes such loading fail).
Helpers, the local-file mteb tasks and the sentence-transformers guard are at the bottom of the file.
"""
import argparse
import difflib
import gc
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import policy

DEFAULT_MAX_NEW_TOKENS = 256  # when the checkpoint has no grace.json (the release: 2048)
DEFAULT_MAX_LENGTH = 1024


class UsageError(Exception):
    """Bad input from the user: main() prints it as one line and exits with status 2."""


# ----------------------------------------------------------------------------- encoding (no mteb)

def encode_texts(model, tokenizer, texts, *, batch_size=16, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
                 top_p=1.0, rationale=True, system_prompt=policy.DEFAULT_SYSTEM_PROMPT, max_length=DEFAULT_MAX_LENGTH,
                 seed=0, sort=True, return_rationales=False, progress=False, stats=None, desc=None, compile=False):
    """(N, H) float32 numpy embeddings of `texts` by policy.encode, in their order [, and the rationales].

    sort=True batches texts of similar token length together (longest first, so an out-of-memory
    shows at once), which keeps left padding and the rollout's ragged tails small; results go back
    in input order. Greedy decoding makes a text's embedding independent of its batch; sampling
    (temperature > 0) draws from one generator seeded with `seed`, so it repeats for the same batches.
    progress: a tqdm bar (True, False, or None = only on a terminal). stats: a dict to add counts to
    (texts, rationale tokens without the stop token, empty rationales, prompts cut to max_length).
    compile: policy.encode's compiled sampler (static cache + torch.compile, bucketed prompt widths).
    """
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    rationales = [""] * len(texts)
    order = list(range(len(texts)))
    if sort and texts:
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = {} if stats is None else stats
    bar = tqdm(total=len(texts), unit="text", desc=desc, leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        enc = policy.encode(model, tokenizer, [texts[i] for i in idx], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, system_prompt=system_prompt, max_length=max_length,
                            rationale=rationale, generator=generator, compile=compile)
        out[idx] = enc.embeddings.float().cpu().numpy()
        if rationale:
            rats, n_tokens, empty = policy.rationale_stats(tokenizer, enc.rollout)
        else:
            rats, n_tokens, empty = [""] * len(idx), torch.zeros(1), torch.zeros(1)
        for i, r in zip(idx, rats):
            rationales[i] = r
        for key, value in (("texts", len(idx)), ("tokens", int(n_tokens.sum())), ("cut", int(enc.prompts_cut.sum())),
                           ("empty", int(empty.sum()))):
            stats[key] = stats.get(key, 0) + value
        bar.update(len(idx))
        bar.set_postfix(rationale=f"{stats['tokens'] / stats['texts']:.0f} tok", refresh=False)
    bar.close()
    return (out, rationales) if return_rationales else out


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
    return settings


class GraceEncoder:
    """A GRACE policy as an encoder: `encode(list of str)` like sentence-transformers, and mteb's protocol.

    max_new_tokens, system_prompt and max_length default to the checkpoint's grace.json, else 256, the
    default prompt and 1024; decoding is greedy unless temperature > 0. instructions=True appends
    mteb's task instruction (by prompt type: query vs document) to the system prompt, so it steers the
    rationale while staying out of the pooled tokens. `stats` counts texts, rationale tokens, empty ones.
    """

    def __init__(self, model_name_or_path="tiny", revision=None, *, max_new_tokens=None, batch_size=16,
                 temperature=0.0, top_p=1.0, device=None, rationale=True, seed=0, instructions=False,
                 system_prompt=None, max_length=None, model=None, tokenizer=None, progress=False, compile="auto"):
        saved = checkpoint_settings(model_name_or_path)
        picked = {}
        for key, given, saved_key, fallback in (("max_new_tokens", max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                                                ("system_prompt", system_prompt, "system_prompt", policy.DEFAULT_SYSTEM_PROMPT),
                                                ("max_length", max_length, "max_prompt_tokens", DEFAULT_MAX_LENGTH)):
            source = "given" if given is not None else "grace.json" if saved.get(saved_key) is not None else "default"
            picked[key] = (given if given is not None else saved.get(saved_key, fallback), source)
        self.sources = {k: src for k, (_, src) in picked.items()}
        max_new_tokens, system_prompt, max_length = (picked[k][0] for k in ("max_new_tokens", "system_prompt", "max_length"))
        if device is None:  # under torchrun, each rank its own GPU
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        if model is None:
            model, tokenizer = policy.load(model_name_or_path, device=device, dtype=policy.low_precision(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        try:  # the template alone must fit max_length: fail now, not in the middle of a task
            policy.build_prompts(tokenizer, ["x"], system_prompt, max_length)
        except ValueError as e:
            raise UsageError(f"--max-length {max_length}: {e}") from e
        if compile == "auto":  # the compiled sampler pays off on CUDA; on CPU it compiles each new shape
            compile = torch.device(device).type == "cuda"
        self.settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, rationale=rationale, max_length=max_length, seed=seed,
                             compile=compile in (True, "on"))
        self.system_prompt, self.instructions, self.progress = system_prompt, instructions, progress
        self.name_or_path, self.revision = model_name_or_path, revision
        self.stats = {"texts": 0, "tokens": 0, "empty": 0, "cut": 0, "calls": 0}
        self._meta = None

    def describe(self):
        """One line: the settings that shape the embeddings, and where each came from."""
        s, src = self.settings, self.sources
        prompt = self.system_prompt if len(self.system_prompt) <= 60 else self.system_prompt[:57] + "..."
        rationale = (f"rationale <= {s['max_new_tokens']} tokens ({src['max_new_tokens']}), "
                     + ("greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}, "
                        f"seed {s['seed']}") if s["rationale"] else "no rationale")
        return (f"{rationale}; prompt <= {s['max_length']} tokens ({src['max_length']}); "
                f"system prompt ({src['system_prompt']}): {prompt!r}")

    def encode_texts(self, texts, system_prompt=None, return_rationales=False, batch_size=None, progress=None, desc=None):
        kw = dict(self.settings, system_prompt=system_prompt or self.system_prompt)
        kw["batch_size"] = batch_size or kw["batch_size"]
        self.stats["calls"] += 1
        return encode_texts(self.model, self.tokenizer, texts, return_rationales=return_rationales, stats=self.stats,
                            progress=self.progress if progress is None else progress, desc=desc, **kw)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None,
               batch_size=None, show_progress_bar=None, convert_to_tensor=False, normalize_embeddings=True, **kwargs):
        """A str or list of str -> float32 numpy (N, H) (a torch tensor with convert_to_tensor), as
        sentence-transformers does; mteb's DataLoader of {"text": [...]} batches -> numpy (mteb's protocol).

        Embeddings are always L2-normalised (GRACE's definition): normalize_embeddings is accepted for
        compatibility only. A whitespace-only text is refused, as training refuses it.
        """
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs)):
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
            if blank is not None:
                raise ValueError(f"text {blank} is empty or whitespace only: GRACE refuses it, as training does")
            emb = self.encode_texts(texts, batch_size=batch_size, progress=bool(show_progress_bar))
            emb = emb[0] if isinstance(inputs, str) else emb
            return torch.from_numpy(emb) if convert_to_tensor else emb
        texts = [t for batch in inputs for t in batch["text"]]  # mteb: a DataLoader of dict batches
        system_prompt = self.system_prompt_for(task_metadata, prompt_type)
        desc = getattr(task_metadata, "name", None)
        rank, world = _dist()
        if world == 1:
            return self.encode_texts(texts, system_prompt, batch_size=batch_size, desc=desc)
        # torchrun: every rank runs the same mteb task; each embeds every world-th text, all gather.
        parts = [None] * world
        mine = self.encode_texts(texts[rank::world], system_prompt, batch_size=batch_size, desc=desc)
        torch.distributed.all_gather_object(parts, mine)
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for r, part in enumerate(parts):
            out[r::world] = part
        return out

    def system_prompt_for(self, task_metadata, prompt_type):
        instruction = task_metadata.prompt if self.instructions and task_metadata is not None else None
        if isinstance(instruction, dict):
            instruction = instruction.get(getattr(prompt_type, "value", prompt_type))
        elif getattr(prompt_type, "value", prompt_type) == "document":
            instruction = None  # a single task instruction describes the query side, as in mteb
        return f"{self.system_prompt}\nTask: {instruction}" if instruction else self.system_prompt

    def similarity(self, embeddings1, embeddings2):
        a, b = (torch.nn.functional.normalize(torch.as_tensor(np.asarray(e), dtype=torch.float32).reshape(-1, e.shape[-1]),
                                              dim=-1) for e in (embeddings1, embeddings2))
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2):
        a, b = (torch.nn.functional.normalize(torch.as_tensor(np.asarray(e), dtype=torch.float32), dim=-1)
                for e in (embeddings1, embeddings2))
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta, built on first use (so that plain `encode` never imports mteb)."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            s = self.settings
            # Settings that change the embeddings go into experiment_kwargs: mteb files results under them.
            experiment = dict(rationale=s["rationale"], instructions=self.instructions, seed=s["seed"],
                              **({k: s[k] for k in ("max_new_tokens", "temperature", "top_p")} if s["rationale"] else {}))
            if s["max_length"] != DEFAULT_MAX_LENGTH:  # these two only when changed: default runs keep their folder
                experiment["max_length"] = s["max_length"]
            if self.system_prompt != policy.DEFAULT_SYSTEM_PROMPT:  # a short hash: the name becomes a folder name
                experiment["system_prompt"] = hashlib.sha1(self.system_prompt.encode()).hexdigest()[:10]
            name, rev = model_id(self.name_or_path, self.model)
            self._meta = ModelMeta.create_empty(dict(
                name=name, revision=self.revision or rev,
                similarity_fn_name=ScoringFunction.COSINE,  # the enum: a plain string fails at scoring time
                embed_dim=self.model.config.hidden_size, n_parameters=sum(p.numel() for p in self.model.parameters()),
                max_tokens=s["max_length"], framework=["PyTorch"], use_instructions=self.instructions,
                open_weights=True, experiment_kwargs=experiment))
        return self._meta


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size=16, max_length=DEFAULT_MAX_LENGTH):
    """exp(mean negative log-likelihood per token) of plain texts, teacher-forced (policy.token_logprobs).

    Each text is tokenized as plain text (no chat template) with the tokenizer's own special tokens
    (add_special_tokens=True: a BOS where the tokenizer adds one), cut to max_length tokens, no EOS
    appended. Every token but the first of each text is scored (the first has no prefix); the mean is
    over all scored tokens of all texts.
    """
    device = next(model.parameters()).device
    ids = [x for x in tokenizer([str(t) for t in texts], add_special_tokens=True, truncation=True,
                                max_length=max_length)["input_ids"]]
    nll, count = 0.0, 0
    for s in range(0, len(ids), batch_size):
        rows = ids[s:s + batch_size]
        width = max(len(r) for r in rows)
        seqs = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(seqs)
        for i, r in enumerate(rows):  # left-padded, as everywhere in the project
            seqs[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        scored = mask.clone()
        scored[torch.arange(len(rows)), width - torch.tensor([len(r) for r in rows])] = 0  # each text's first token
        logp = policy.token_logprobs(model, seqs.to(device), mask.to(device), scored.to(device))
        nll -= logp.double().sum().item()
        count += int(scored.sum())
    if count == 0:
        raise UsageError("perplexity: no text has two or more tokens")
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- the CLI

def parse_args(argv=None):
    p = _Parser(description="MTEB scores of a GRACE policy (a rationale per text, then mean pooling).",
                formatter_class=_Help)
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", help="model folder, hub name or 'tiny'; twice = compare (default: tiny)")
    g.add_argument("--baseline", help="a second model, evaluated the same way and shown side by side")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, in bf16, else cpu)")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--tasks", help="comma-separated mteb task names, e.g. STSBenchmark,SciFact")
    g.add_argument("--benchmark", help="an mteb benchmark name, e.g. 'MTEB(eng, v1)' (the classic English MTEB)")
    g.add_argument("--local", "--local-files", action="append", metavar="FILE_OR_DIR",  # torchrun takes --local
                   help="your own task: STS .jsonl | BEIR retrieval folder | classification file or train+test folder")
    g.add_argument("--limit", type=int, help="smoke run: the first N pairs (STS), queries (retrieval) or rows per "
                   "split (classification) of each --local task; refused with hub tasks, which mteb runs whole")
    g.add_argument("--perplexity", metavar="FILE", help="also print each model's LM perplexity on these texts (one per line)")
    g.add_argument("--explain", nargs="+", metavar="TEXT", help="print the rationale written for each text, then stop")
    g.add_argument("--corpus", help="with --explain: texts to search (one per line, or .jsonl/.csv with 'text')")
    g.add_argument("--top-k", type=int, default=3, help="with --corpus: nearest texts shown per text")
    g = p.add_argument_group("the embedding")
    g.add_argument("--max-new-tokens", type=int, help="rationale length cap (default: the checkpoint's grace.json, else 256)")
    g.add_argument("--system-prompt", help="the instruction before each text (default: grace.json's, else policy's)")
    g.add_argument("--max-length", type=int, help="prompt length cap in tokens (default: grace.json's, else 1024)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; the release samples at 1.0")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, with --temperature > 0")
    g.add_argument("--no-rationale", action="store_true", help="pool the prompt alone: the base-model baseline")
    g.add_argument("--instructions", action="store_true", help="add mteb's task instruction to the system prompt")
    g.add_argument("--batch-size", type=int, default=16, help="texts per forward")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="static-cache + torch.compile sampler; auto = on for CUDA, off on CPU")
    g = p.add_argument_group("results")
    g.add_argument("--out", default="results", help="folder of mteb's result JSONs, reused by reruns ('' = keep none)")
    g.add_argument("--recompute", action="store_true", help="ignore results already in --out, and overwrite them")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    args = p.parse_args(argv)
    bounds = dict(batch_size=(1, 2 ** 16), max_new_tokens=(0, 2 ** 17), max_length=(1, 2 ** 20), top_k=(1, 10 ** 6),
                  seed=(0, 2 ** 63 - 1), limit=(1, 2 ** 40), temperature=(0, 100))
    for k, (low, high) in bounds.items():
        v = getattr(args, k)
        if v is not None and not (low <= v <= high):  # also refuses nan
            p.error(f"--{k.replace('_', '-')} must be at {'least' if not v > low else 'most'} "
                    f"{low if not v > low else high}, got {v}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.explain and (args.tasks or args.benchmark or args.local or args.perplexity or args.limit):
        p.error("--explain prints rationales only: drop --tasks, --benchmark, --local, --perplexity and --limit")
    if args.corpus and not args.explain:
        p.error("--corpus is searched with --explain TEXT; without --explain it does nothing")
    if args.limit and (args.tasks or args.benchmark):
        p.error("--limit cuts --local tasks only; mteb's hub tasks run whole (drop --limit or the hub tasks)")
    if args.system_prompt is not None and not args.system_prompt.strip():
        p.error("--system-prompt is empty")
    if args.device:
        try:
            policy.check_device(args.device)
        except ValueError as err:
            p.error(f"--device {err}")
    if args.explain and any(not t.strip() for t in args.explain):
        p.error("--explain: a text is empty or whitespace only")
    args.model = (args.model or ["tiny"]) + ([args.baseline] if args.baseline else [])
    return args


def run(args):
    rank, world = _dist()
    enc_kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                      top_p=args.top_p, device=args.device, rationale=not args.no_rationale, seed=args.seed,
                      instructions=args.instructions, max_length=args.max_length, system_prompt=args.system_prompt,
                      progress=False if args.no_progress or rank else None, compile=args.compile)
    for name in args.model:  # a typo in the second model's name should not wait for the first one's tasks
        check_model_name(name)
    if args.explain:
        encoder = GraceEncoder(args.model[0], **enc_kwargs)
        print(f"== {args.model[0]}: {encoder.describe()}")
        explain(encoder, args.explain, args.corpus, args.top_k)
        return 0
    tasks = resolve_tasks(args) if args.tasks or args.benchmark or args.local else []  # before loading any model
    ppl_texts = _texts(args.perplexity) if args.perplexity else None
    if not tasks and not ppl_texts:
        raise UsageError("nothing to evaluate: give --tasks, --benchmark, --local, --perplexity or --explain")
    # Under torchrun only rank 0 writes, and it recomputes: a cached task skipped on one rank alone would hang the others.
    cache = result_cache(args.out) if args.out and rank == 0 else None
    overwrite = "always" if args.recompute or world > 1 else "only-missing"
    columns, stats, ppl = {}, {}, {}
    for name in args.model:
        encoder = GraceEncoder(name, **enc_kwargs)
        label = encoder.mteb_model_meta.name if tasks else str(name)
        label = label if label not in stats else f"{label} ({len(stats) + 1})"
        _say(rank, f"== {label}: {encoder.describe()}")
        if tasks:
            columns[label] = evaluate_model(encoder, tasks, cache, args.batch_size, overwrite, rank)
            if cache is not None:
                _say(rank, f"   results in {cache.get_task_result_path('TASK', encoder.mteb_model_meta).parent}")
        stats[label] = dict(encoder.stats, rationale=encoder.settings["rationale"])
        if ppl_texts:
            ppl[label] = perplexity(encoder.model, encoder.tokenizer, ppl_texts, args.batch_size, encoder.settings["max_length"])
            _say(rank, f"   perplexity on {len(ppl_texts)} texts of {args.perplexity}: {ppl[label]:.2f}")
        del encoder  # one model in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if rank == 0 and tasks:
        print(summary_table(columns, {t.metadata.name: t.metadata.type for t in tasks}, stats, ppl))
    return 0


def evaluate_model(encoder, tasks, cache, batch_size, overwrite="only-missing", rank=0):
    """{task name: main score} through mteb.evaluate, one task at a time: a line per task as it ends."""
    import mteb
    from datasets.exceptions import DatasetNotFoundError

    scores = {}
    for task in tasks:
        name, before, start = task.metadata.name, dict(encoder.stats), time.perf_counter()
        try:
            result = mteb.evaluate(encoder, task, cache=cache, encode_kwargs={"batch_size": batch_size},
                                   overwrite_strategy=overwrite, show_progress_bar=False)
        except (ConnectionError, DatasetNotFoundError) as e:  # offline, or a hub hiccup
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"task {name}: its data set could not be downloaded ({first}); "
                             "evaluate your own files offline with --local FILE_OR_DIR") from None
        scores[name] = result.task_results[0].get_score()
        n = encoder.stats["texts"] - before["texts"]
        if encoder.stats["calls"] == before["calls"]:
            note = "(cached)"
        elif not encoder.settings["rationale"]:
            note = f"{n} texts, no rationale"
        else:
            tokens, empty = encoder.stats["tokens"] - before["tokens"], encoder.stats["empty"] - before["empty"]
            note = f"{n} texts, rationale {tokens / max(n, 1):.1f} tokens, {100 * empty / max(n, 1):.0f}% empty"
        _say(rank, f"   {name:<32} {100 * scores[name]:7.2f}  {time.perf_counter() - start:7.1f}s  {note}")
    return scores


def summary_table(columns, types, stats=None, perplexities=None):
    """Text table: task, type, one score column per model (x100), their difference; averages per type;
    then per model the mean rationale length, the share of empty rationales and the perplexity."""
    labels, rows = list(columns), list(next(iter(columns.values())))
    groups = [(f"average {k} ({sum(types[r] == k for r in rows)})", [r for r in rows if types[r] == k])
              for k in sorted(set(types.values()))] + [(f"average, all ({len(rows)})", rows)]
    width = max(len(name) for name in rows + [title for title, _ in groups] + ["empty rationales (%)"])
    cw = max(len(m) for m in labels) + 2  # score column width

    def line(name, kind, values, scale=100):  # None: not measured (a cached result)
        s = f"{name:<{width}}  {kind:<18}" + "".join(f"{'-':>{cw}}" if v is None else f"{scale * v:>{cw}.2f}"
                                                     for v in values)
        return s + (f"{scale * (values[0] - values[1]):>+10.2f}" if len(values) == 2 and None not in values else "")

    head = f"{'task':<{width}}  {'type':<18}" + "".join(f"{m:>{cw}}" for m in labels)
    head += f"{'diff':>10}" if len(labels) == 2 else ""
    rule = "-" * len(head)
    body = [line(r, types[r], [columns[m][r] for m in labels]) for r in rows]
    means = [line(title, "", [np.mean([columns[m][r] for r in members]) for m in labels]) for title, members in groups]
    extra = []
    if stats and any(stats[m]["texts"] for m in labels):  # all cached: nothing was generated this run
        share = lambda m, key: stats[m][key] / stats[m]["texts"] if stats[m]["texts"] and stats[m].get(  # noqa: E731
            "rationale", True) else None
        extra += [line("rationale tokens (mean)", "", [share(m, "tokens") for m in labels], 1),
                  line("empty rationales (%)", "", [share(m, "empty") for m in labels])]
    if perplexities:
        extra.append(line("perplexity", "", [perplexities[m] for m in labels], 1))
    return "\n".join([head, rule, *body, rule, *means] + ([rule, *extra] if extra else []))


def explain(encoder, texts, corpus=None, top_k=3):
    """Print the rationale for each text; with a corpus, its nearest texts and their rationales."""
    emb, rats = encoder.encode_texts(texts, return_rationales=True)
    if corpus:
        docs = _texts(corpus)
        doc_emb, doc_rats = encoder.encode_texts(docs, return_rationales=True)
    for i, text in enumerate(texts):
        print(f"=== text: {text}\n--- rationale: {rats[i]}")
        if corpus:
            sims = doc_emb @ emb[i]
            for j in np.argsort(-sims)[:top_k]:
                print(f"  [{sims[j]:.3f}] {docs[j]}\n          rationale: {doc_rats[j]}")
        print()


def main(argv=None):
    try:
        args = parse_args(argv)
    except SystemExit as e:  # -h, or a bad flag (already printed as one line)
        return e.code
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return run(args)
    except (UsageError, data.DataError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- CLI helpers

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other input error (not usage + message)
        print(f"error: {message} (see: python evaluate.py -h)", file=sys.stderr)
        raise SystemExit(2)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" for real defaults only, not None/False
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def _say(rank, text):
    if rank == 0:
        print(text, flush=True)


def _dist():
    """(rank, world size): torchrun's process group if one is up, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _texts(path):
    """Texts of a file: one per line (.txt, blank lines skipped) or a 'text' field (.jsonl/.csv); none may be blank."""
    texts = [data.text_field(path, n, row, "text") for n, row in data.read_rows(path)]
    if not texts:
        raise UsageError(f"{path}: no texts")
    return texts


def check_model_name(name):
    """Fail at once on a model that cannot load: a missing folder, or a hub name neither cached nor reachable."""
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
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") else ""
        raise UsageError(f"model {name!r}: not a local folder, and not found on the hub{offline}: {first}") from None


def _closest(name, choices):
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; close matches: {', '.join(close)}" if close else ""


def resolve_tasks(args):
    """Task objects from --tasks, --benchmark and --local; unknown names list their close matches."""
    import mteb

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
    for path in args.local or []:
        task = local_task(path, args.limit)
        task.load_data()  # read and check the file now: a bad row fails before any model loads
        tasks.append(task)
    return tasks


def result_cache(out):
    """mteb's ResultCache writing to OUT/MODEL/REVISION/... (mteb's own would write OUT/results/MODEL/...)."""
    import mteb

    class Cache(mteb.ResultCache):
        def get_task_result_path(self, *args, remote=False, **kwargs):
            path = super().get_task_result_path(*args, remote=remote, **kwargs)
            return path if remote else self.cache_path / path.relative_to(self.cache_path / "results")

    return Cache(out)


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
    if str(name) == "tiny-lm":  # the shipped folder: a rebuilt tiny-lm gets a new revision
        return "grace/tiny-lm", _fingerprint(policy.TINY_LM.iterdir())
    if path.is_dir():
        path = path.resolve()
        return f"{path.parent.name}/{path.name}", _fingerprint(path.iterdir())
    return str(name), getattr(model.config, "_commit_hash", None) or "unknown"  # hub: the commit, if kept


# ----------------------------------------------------------------------------- local files as mteb tasks

def local_task(path, limit=None):
    """The mteb task for a local file or folder, chosen by its layout (STS, retrieval, classification)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "corpus.jsonl").exists() or (path / "queries.jsonl").exists():
            splits = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
            if not splits:
                raise UsageError(f"{path / 'qrels'}: no .tsv judgement files (qrels/SPLIT.tsv)")
            return _local(LocalRetrieval, "Retrieval", path, splits, "ndcg_at_10", limit)
        return _local(LocalClassification, "Classification", path, ["test"], "accuracy", limit)
    rows = data.read_rows(path)
    keys = set(rows[0][1]) if rows else set()
    if {"sentence1", "sentence2"} <= keys:
        return _local(LocalSTS, "STS", path, ["test"], "cosine_spearman", limit)
    if "text" in keys and keys & {"label", "category"}:
        return _local(LocalClassification, "Classification", path, ["test"], "accuracy", limit)
    raise UsageError(f"{path}:{rows[0][0] if rows else 1}: expected fields sentence1, sentence2, score (STS) or "
                     f"text, label (classification); found {', '.join(sorted(keys)) or 'none'}")


def _local(kind, type_name, path, splits, main_score, limit):
    """An instance of a fresh subclass of `kind` for this file: mteb's unload_data drops an instance's
    own metadata, so the metadata must live on the class. --limit N is in the name: results apart."""
    from mteb.abstasks.task_metadata import TaskMetadata

    name = f"Local{type_name}_{path.stem}" + (f"_first{limit}" if limit else "")
    metadata = TaskMetadata(
        name=name, type=type_name, main_score=main_score, eval_splits=splits,
        description=f"Local {type_name} task read from {path}", reference=None, eval_langs=["eng-Latn"],
        dataset={"path": str(path.resolve()), "revision": _fingerprint([path, *path.rglob("*")])},  # edit: new rev
        category="t2t", modalities=["text"], bibtex_citation="")
    return type(name, (kind, _mteb_base(type_name)), {"metadata": metadata, "path": path, "limit": limit})()


def _mteb_base(type_name):
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    return {"STS": AbsTaskSTS, "Retrieval": AbsTaskRetrieval, "Classification": AbsTaskClassification}[type_name]


class LocalSTS:
    """JSONL with sentence1, sentence2, score (data.load_sts_pairs): every pair is a test pair."""

    def load_data(self, num_proc=None, **kwargs):
        from datasets import Dataset, DatasetDict

        pairs = data.load_sts_pairs(self.path, limit=self.limit)
        scores = [s for _, _, s in pairs]
        self.min_score, self.max_score = min(scores), max(scores)
        self.dataset = DatasetDict(test=Dataset.from_dict({
            "sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs], "score": scores}))
        self.data_loaded = True


class LocalRetrieval:
    """BEIR folder (data.load_retrieval): each qrels/SPLIT.tsv is a split; its queries are those it judges.
    With --limit N, the first N judged queries of each split, searched among the whole corpus."""

    def load_data(self, num_proc=None, **kwargs):
        from datasets import Dataset
        from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

        corpus, queries, qrels = data.load_retrieval(self.path)
        corpus = Dataset.from_list([{"id": i, "title": t, "text": x} for i, (t, x) in corpus.items()])
        self.dataset = {"default": {}}
        for split in self.metadata.eval_splits:
            judged = dict(list(qrels[split].items())[:self.limit] if self.limit else qrels[split])
            self.dataset["default"][split] = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": queries[q]} for q in judged]),
                corpus=corpus, relevant_docs=judged, top_ranked=None)
        self.data_loaded = True


class LocalClassification:
    """text + label (or category), one file split here or a train/test folder (data.load_classification);
    mteb's logistic regression on the embeddings. --limit N keeps the first N rows of each split."""

    def load_data(self, num_proc=None, **kwargs):
        from datasets import Dataset, DatasetDict

        splits = data.load_classification(self.path)
        if self.limit:  # the first rows of each label in turn, so that a file sorted by label keeps them all
            by_label = {}
            for row in [r for rows in splits.values() for r in rows]:
                by_label.setdefault(row[1], [])
            splits = {s: [r for group in itertools.zip_longest(*[[r for r in rows if r[1] == k] for k in by_label])
                          for r in group if r][:self.limit] for s, rows in splits.items()}
            if len({label for _, label in splits["train"]}) < 2:
                raise UsageError(f"{self.path}: --limit {self.limit} leaves a single label to train on; raise it")
        ids = {name: i for i, name in enumerate(sorted({label for rows in splits.values() for _, label in rows}))}
        self.dataset = DatasetDict({  # sklearn wants labels; ints keep mteb's statistics happy
            split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [ids[label] for _, label in rows]})
            for split, rows in splits.items()})
        self.data_loaded = True


if __name__ == "__main__":
    sys.exit(main())
