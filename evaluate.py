"""Evaluate a GRACE policy as a text encoder: in Python, and through mteb's own API.

The embedding of a text is policy.encode's, the one definition training uses too: system prompt +
text -> a rationale written by the model (greedy by default) -> the L2-normalised mean of the last
hidden states over text + rationale. --no-rationale pools the prompt alone: the base-model baseline.
--protocol release embeds as the authors' evaluation did (sampled, 2048 tokens, the raw mean) and
runs their 55 tasks; docs/evaluation.md compares the two.

    from evaluate import GraceEncoder   # in a clone; after `pip install .`: from grace import ...
    emb = GraceEncoder("out/final").encode(["a text", "another"])   # (2, H) float32, unit vectors

    python evaluate.py --model out/final --baseline Qwen/Qwen2.5-1.5B-Instruct --tasks SciFact
    python evaluate.py --model out/final --local path/to/sts/dev.jsonl --limit 100   # a smoke run
    python evaluate.py --model out/final --explain "A man plays a guitar." --corpus sentences.txt

A checkpoint's grace.json (written by train.py) sets the default rationale length and system prompt.
Every model of a run (--baseline) embeds with the first model's resolved settings. Results are
mteb's, in its layout under --out (results/MODEL/REVISION/experiments/SETTINGS/TASK.json), reused
by a rerun ("(cached)") unless --recompute. Flags: infra/cli.py; plumbing: infra/mteb_tasks.py.
"""
import functools
import gc
import os
import sys

import numpy as np
import torch

import policy
import rollout
from infra import cli, console, data, diagnostics, dist, encoder_inputs, fast_decode, mteb_tasks
from infra.cli import UsageError
from infra.mteb_tasks import DEFAULT_MAX_LENGTH, DEFAULT_MAX_NEW_TOKENS


# ----------------------------------------------------------------------------- encoding (no mteb)

def encode_texts(model, tokenizer, texts, *, batch_size=16, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                 temperature=0.0, top_p=1.0, rationale=True,
                 system_prompt=policy.DEFAULT_SYSTEM_PROMPT, max_length=DEFAULT_MAX_LENGTH, seed=0,
                 normalize=True, sort=True, return_rationales=False, progress=False, stats=None,
                 desc=None, compile=False):
    """(N, H) float32 numpy embeddings of `texts` by policy.encode, in their order [, rationales].

    sort=True batches texts of similar token length (longest first: an out-of-memory shows at once),
    so padding stays small. Greedy decoding makes a text's embedding independent of its batch;
    sampling draws from one generator seeded with `seed`. normalize=False: the raw mean (the
    release's evaluation). progress: a tqdm bar (None: terminal). The rationale is bounded by the
    model's positions (encoder_inputs.rationale_cap). stats: a dict to add counts to (texts,
    rationale tokens, empty rationales, prompts cut). A bad number: one ValueError line."""
    encoder_inputs.check_numbers(locals())  # the arguments, before anything runs
    max_new_tokens = encoder_inputs.rationale_cap(model.config, max_length,
                                                  max_new_tokens)[0] if rationale else 0
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    rationales = [""] * len(texts)
    order = list(range(len(texts)))
    if sort and texts:
        lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order.sort(key=lambda i: -lengths[i])
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stats = {} if stats is None else stats
    bar = console.progress_bar(total=len(texts), unit="text", desc=desc, leave=False,
                               disable=None if progress is None else not progress)
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        step = fast_decode.static_step(model) if compile else rollout.plain_step(model)
        enc = policy.encode(model, tokenizer, [texts[i] for i in idx], temperature=temperature,
                            max_new_tokens=max_new_tokens, top_p=top_p,
                            system_prompt=system_prompt, max_length=max_length, generator=generator,
                            normalize=normalize, step=step)
        out[idx] = enc.embeddings.float().cpu().numpy()
        rats, n_tokens, empty = diagnostics.rationale_stats(tokenizer, enc.rollout)
        for i, r in zip(idx, rats):  # back in input order
            rationales[i] = r
        for key, value in (("texts", len(idx)), ("tokens", int(n_tokens.sum())),
                           ("cut", int(enc.prompts_cut.sum())),
                           ("empty", int(empty.sum()) if rationale else 0)):
            stats[key] = stats.get(key, 0) + value
        bar.update(len(idx))
        bar.set_postfix(rationale=f"{stats['tokens'] / stats['texts']:.0f} tok", refresh=False)
    bar.close()
    return (out, rationales) if return_rationales else out


class GraceEncoder:
    """A GRACE policy as an encoder: `encode(list of str)` like sentence-transformers, and mteb's
    protocol. A setting left None is the protocol's (mteb_tasks.PROTOCOLS): under "grace", the
    checkpoint's grace.json for max_new_tokens, system_prompt and max_length, else 256, the default
    prompt, 1024; greedy; L2-normalised. "release": the authors' evaluation (2048 tokens, their
    prompt, 1024, temperature 1, top-p 1, the raw mean). instructions=True appends mteb's task
    instruction (by prompt type: query vs document) to the system prompt, so it steers the
    rationale while staying out of the pooled tokens. threads: torch's CPU threads (None: torch's
    default). `stats` counts texts, tokens, empty ones. A bad argument: a ValueError line."""

    def __init__(self, model_name_or_path="tiny", revision=None, *, protocol="grace",
                 max_new_tokens=None, system_prompt=None, max_length=None, temperature=None,
                 top_p=None, normalize=None, seed=0, rationale=True, batch_size=16, device=None,
                 instructions=False, model=None, tokenizer=None, progress=False, compile="auto",
                 threads=1):
        encoder_inputs.check_numbers(locals())  # the numbers given, before anything loads
        picked, self.sources = mteb_tasks.embedding_settings(
            model_name_or_path, protocol, max_new_tokens=max_new_tokens,
            system_prompt=system_prompt, max_length=max_length, temperature=temperature,
            top_p=top_p, normalize=normalize)
        device = device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # torchrun: a GPU a rank
                            if torch.cuda.is_available() else "cpu")
        encoder_inputs.set_threads(threads, device)  # None: torch's default
        if model is None:
            encoder_inputs.check_model_folder(model_name_or_path)
            model, tokenizer = policy.load(model_name_or_path, device=device,
                                           dtype=policy.low_precision(device))
            encoder_inputs.check_finite(model, model_name_or_path)
        encoder_inputs.warn_if_stale(model_name_or_path)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        if rationale:  # a rationale cannot outgrow the model's positions (nor the memory)
            encoder_inputs.cap_rationale(model.config, picked, self.sources)
        try:  # the template alone must fit max_length: fail now, not in the middle of a task
            policy.build_prompts(tokenizer, ["x"], picked["system_prompt"], picked["max_length"])
        except ValueError as e:
            raise UsageError(f"--max-length {picked['max_length']}: {e}") from e
        if compile == "auto":  # the compiled sampler pays off on CUDA; on CPU each shape compiles
            compile = torch.device(device).type == "cuda"
        self.system_prompt, self.instructions = picked.pop("system_prompt"), instructions
        self.settings = dict(batch_size=batch_size, rationale=rationale, seed=seed,
                             compile=compile in (True, "on"), **picked)
        self.progress, self.name_or_path, self.revision = progress, model_name_or_path, revision
        self.stats = {"texts": 0, "tokens": 0, "empty": 0, "cut": 0, "calls": 0}

    def embedding(self):
        """The resolved settings that shape the embeddings, as keyword arguments: a GraceEncoder
        of another model given them embeds exactly as this one does (evaluate.py's --baseline)."""
        keys = "max_new_tokens max_length temperature top_p seed normalize rationale".split()
        return dict({k: self.settings[k] for k in keys}, system_prompt=self.system_prompt)

    def describe(self):
        """One line: the settings that shape the embeddings, and where each came from."""
        return mteb_tasks.describe(self.settings, self.sources, self.system_prompt)

    def encode_texts(self, texts, system_prompt=None, return_rationales=False, batch_size=None,
                     progress=None, desc=None, normalize=None):
        kw = dict(self.settings, system_prompt=system_prompt or self.system_prompt)
        kw["batch_size"] = batch_size or kw["batch_size"]
        kw["normalize"] = kw["normalize"] if normalize is None else normalize
        self.stats["calls"] += 1
        return encode_texts(self.model, self.tokenizer, texts, return_rationales=return_rationales,
                            stats=self.stats, desc=desc,
                            progress=self.progress if progress is None else progress, **kw)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None,
               **options):
        """As sentence-transformers' encode: a str or list of str -> float32 numpy (N, H); every
        other argument of its is honoured or refused in one line (encoder_inputs.st_options).
        normalize_embeddings None: the encoder's normalize. mteb's DataLoader of {"text": [...]}
        batches -> numpy (mteb's protocol). A blank text is refused, as training does."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple))
                                       and all(isinstance(t, str) for t in inputs)):
            return self._embed(inputs, self.system_prompt, options)
        texts = [t for batch in inputs for t in batch["text"]]  # mteb: a DataLoader of dict batches
        return self._embed(texts, self.system_prompt_for(task_metadata, prompt_type), options,
                           gather=True, desc=getattr(task_metadata, "name", None))

    def encode_query(self, inputs, *, instruction=None, **options):
        """encode() for search queries (sentence-transformers >= 5 has it): `instruction` joins
        the system prompt as mteb's query instruction does (system_prompt_for); none: plain."""
        return self._embed(inputs, self.system_prompt_for(None, "query", instruction), options)

    def encode_document(self, inputs, **options):  # the plain system prompt, as mteb's documents
        return self._embed(inputs, self.system_prompt, options)

    def _embed(self, inputs, system_prompt, options, gather=False, **kw):
        # a user's texts (checked) or mteb's (gather: shared out over torchrun's ranks)
        opts = encoder_inputs.st_options(options, self.model.config.hidden_size, self.device)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad and not gather:
            raise ValueError(f"text {bad[0]} is empty or whitespace only, or not a string: "
                             "GRACE refuses it, as training does")
        normalize = self.settings["normalize"] if opts["normalize"] is None else opts["normalize"]
        texts = [opts["prompt"] + t for t in texts]
        kw.update(batch_size=opts["batch_size"], normalize=normalize,
                  progress=opts["progress"] if not gather else None)
        rank, world = dist.rank_world()
        if world == 1 or not gather:
            emb = self.encode_texts(texts, system_prompt, **kw)
        else:  # torchrun: every rank runs the same mteb task, embeds every world-th text; gather
            parts = [None] * world
            torch.distributed.all_gather_object(
                parts, self.encode_texts(texts[rank::world], system_prompt, **kw))
            emb = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
            for r, part in enumerate(parts):
                emb[r::world] = part
        emb = encoder_inputs.shape_output(emb, opts, normalize)
        return emb[0] if isinstance(inputs, str) else emb

    def system_prompt_for(self, task_metadata, prompt_type, instruction=None):
        if instruction is None and self.instructions and task_metadata:
            instruction = task_metadata.prompt
        if isinstance(instruction, dict):
            instruction = instruction.get(getattr(prompt_type, "value", prompt_type))
        elif getattr(prompt_type, "value", prompt_type) == "document":
            instruction = None  # a single task instruction describes the query side, as in mteb
        return f"{self.system_prompt}\nTask: {instruction}" if instruction else self.system_prompt

    def similarity(self, embeddings1, embeddings2):  # cosine, (N, M)
        return _unit(embeddings1) @ _unit(embeddings2).T

    def similarity_pairwise(self, embeddings1, embeddings2):  # cosine, (N,)
        return (_unit(embeddings1) * _unit(embeddings2)).sum(-1)

    @functools.cached_property
    def mteb_model_meta(self):
        """mteb's ModelMeta, built on first use (so that plain `encode` never imports mteb)."""
        return mteb_tasks.model_meta(self)


def _unit(e):  # (N, H) unit vectors
    e = torch.as_tensor(np.asarray(e), dtype=torch.float32)
    return torch.nn.functional.normalize(e.reshape(-1, e.shape[-1]), dim=-1)


# ----------------------------------------------------------------------------- the mteb run

def run(args):
    rank, world = dist.rank_world()
    say = print if rank == 0 else lambda *a, **k: None
    embedding = dict(protocol=args.protocol, max_new_tokens=args.max_new_tokens,
                     system_prompt=args.system_prompt, max_length=args.max_length,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                     normalize=args.normalize, rationale=not args.no_rationale)
    enc_kwargs = dict(batch_size=args.batch_size, device=args.device, threads=args.threads,
                      instructions=args.instructions, compile=args.compile,
                      progress=False if args.no_progress or rank else None)
    for name in args.model:  # a typo in the second model should not wait for the first's tasks
        mteb_tasks.check_model_name(name)
    if args.explain:
        encoder = GraceEncoder(args.model[0], **embedding, **enc_kwargs)
        print(f"== {args.model[0]}: {encoder.describe()}")
        explain(encoder, args.explain, args.corpus, args.neighbours)
        return 0
    named = args.tasks or args.benchmark or args.local
    tasks = mteb_tasks.resolve_tasks(args, say) if named else []
    ppl_texts = mteb_tasks.read_texts(args.perplexity) if args.perplexity else None
    if not tasks and not ppl_texts:
        raise UsageError("nothing to evaluate: give --tasks, --benchmark, --local, --perplexity "
                         "or --explain")
    # Under torchrun only rank 0 writes, and it recomputes: a task cached on one rank would hang.
    cache = mteb_tasks.result_cache(args.out) if args.out and rank == 0 else None
    overwrite = "always" if args.recompute or world > 1 else "only-missing"
    columns, stats, ppl = {}, {}, {}
    for i, name in enumerate(args.model):
        baseline_alone = args.baseline_no_rationale and i == len(args.model) - 1
        encoder = GraceEncoder(name, **dict(embedding, rationale=embedding["rationale"] and
                                            not baseline_alone), **enc_kwargs)
        label = encoder.mteb_model_meta.name if tasks else str(name)
        label = label if label not in stats else f"{label} ({len(stats) + 1})"
        if i == 0:  # every model embeds with the first one's resolved settings
            embedding, first = dict(encoder.embedding(), protocol=args.protocol), label
        else:
            encoder.sources = dict.fromkeys(encoder.sources, f"as {first}")
        say(f"== {label}: {encoder.describe()}", flush=True)
        if tasks:
            columns[label] = mteb_tasks.evaluate_model(encoder, tasks, cache, args.batch_size,
                                                       overwrite, say)
            if cache is not None:
                where = cache.get_task_result_path('TASK', encoder.mteb_model_meta).parent
                say(f"   results in {where}", flush=True)
        stats[label] = dict(encoder.stats, rationale=encoder.settings["rationale"])
        if ppl_texts:
            ppl[label] = diagnostics.perplexity(encoder.model, encoder.tokenizer, ppl_texts,
                                                args.batch_size, encoder.settings["max_length"])
            say(f"   perplexity on {len(ppl_texts)} texts of {args.perplexity}: {ppl[label]:.2f}",
                flush=True)
        del encoder  # one model in memory at a time
        gc.collect()
        torch.cuda.empty_cache()  # a no-op without CUDA
    if tasks:
        say(mteb_tasks.summary_table(columns, {t.metadata.name: t.metadata.type for t in tasks},
                                     stats, ppl))
    return 0


def explain(encoder, texts, corpus=None, neighbours=3):
    """Print the rationale for each text; with a corpus, its nearest texts and their rationales."""
    emb, rats = encoder.encode_texts(texts, return_rationales=True)
    if corpus:
        docs = mteb_tasks.read_texts(corpus)
        doc_emb, doc_rats = encoder.encode_texts(docs, return_rationales=True)
    for i, text in enumerate(texts):
        print(f"=== text: {text}\n--- rationale: {rats[i]}")
        if corpus:
            sims = doc_emb @ emb[i]
            for j in np.argsort(-sims)[:neighbours]:
                print(f"  [{sims[j]:.3f}] {docs[j]}\n          rationale: {doc_rats[j]}")
        print()


def main(argv=None):
    console.quiet()  # third-party bars and known harmless warnings off
    try:
        args = cli.evaluate_args(argv)
    except SystemExit as e:  # -h, or a bad flag (already printed as one line)
        return e.code
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.setup(args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                   threads=args.threads)
    try:
        return run(args)
    except (UsageError, data.DataError, FileNotFoundError) as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # results of finished tasks are on disk, whole (atomic writes)
        print("stopped (Ctrl-C); finished tasks' results are kept", file=sys.stderr)
        return 130
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
