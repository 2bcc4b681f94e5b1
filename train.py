"""Train a GRACE policy: data -> rollouts -> rewards -> advantages -> clipped policy gradient -> update.

    python train.py                                   # tiny demo on CPU (data/sample_triples.jsonl)
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --data triples.jsonl
    torchrun --nproc_per_node=4 train.py --model ... --data ...   # data-parallel, one shard of groups per rank

One step (supervised): for a batch of B records, G rationales of every positive at --temperature (the
"main" rollouts, the only ones trained), one of every query and negative at 0.5; embeddings of all of
them (no gradient); reward.py turns them into one reward per main rollout; advantages are rewards minus
their group's mean; then --ppo-epochs passes of mini-batches of the clipped policy-gradient loss with a
KL penalty to the frozen initial model. Unsupervised: one text per record; its own 0.5-temperature
rationale plays the query.

Precision: weights, gradients and AdamW state stay float32 ("master weights"); on CUDA every forward
(rollouts, embeddings, log-probs) runs under bf16 autocast (policy.autocast). bf16 matmuls run at full
speed, bf16 has float32's range (no loss scaling), and a 1e-6 update is not rounded away as it would be
on bf16 weights. Cost: 16 bytes per parameter (1.5B -> 24 GB); FSDP would be the next step for models
that do not fit one GPU.
"""
import argparse
import json
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import policy
import reward
import rollout

SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample_triples.jsonl"
STS_DEV = Path(__file__).resolve().parent.parent / "shared" / "data" / "stsbenchmark" / "dev.jsonl"
# Defaults: the authors' release (Qwen2.5-1.5B-Instruct, 4 x H100), or a CPU demo for the built-in tiny
# model. tiny is random, and at the release's lr 1e-6 nothing would move in 20 steps: 3e-4 shows learning.
RELEASE = dict(batch_size=64, group_size=8, mini_batch_size=16, max_new_tokens=2048, lr=1e-6, epochs=2, steps=None)
TINY = dict(batch_size=8, group_size=4, mini_batch_size=4, max_new_tokens=24, lr=3e-4, epochs=None, steps=20)


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2, nothing written."""


# ----------------------------------------------------------------------------- the math

def group_advantages(rewards, group_size, scale_by_std=False, eps=1e-6):
    """A_i = r_i - mean_{j in group(i)} r_j  [ / (std_group + eps) ], rewards (N,) -> (N,) float32.

    std is the population std (unbiased=False): torch.std's default would be sqrt(G/(G-1)) larger
    (x1.07 at G = 8, x1.41 at G = 2) and undefined at G = 1. A group of equal rewards gives 0, not NaN.
    """
    r = rewards.float().reshape(-1, group_size)  # (n, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def kl_estimate(logp, ref_logp, kl_type):
    """Per-token estimates of KL(pi || ref) from samples of pi, d = ref - logp:
    k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1 (non-negative, low variance)."""
    d = ref_logp - logp
    return {"k1": lambda: -d, "k2": lambda: 0.5 * d ** 2, "k3": lambda: torch.exp(d) - d - 1}[kl_type]()


def aggregate(x, mask, how, max_new_tokens=None):
    """Reduce per-token x (B, T) over mask: token-mean | sequence-mean | Dr.GRPO's constant B*L."""
    x = x * mask
    if how == "token":
        return x.sum() / mask.sum().clamp(min=1)
    if how == "sequence":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if how == "constant":  # a fixed number, not the padded width, which changes when rollouts stop early
        return x.sum() / (mask.shape[0] * max_new_tokens)
    raise ValueError(f"aggregation must be token, sequence or constant, got {how!r}")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.001, kl_type="k3",
                aggregation="token", max_new_tokens=None, dual_clip=3.0):
    """Clipped policy-gradient loss + KL penalty; logp/old_logp/ref_logp/mask (B, T), advantages (B,).

    loss_t = -min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + kl_coef * k(logp_t, ref_t), rho = exp(logp - old)
    dual_clip c (verl's clip_ratio_c): for A < 0 the loss is also capped at -c A, so one token whose
    ratio exploded cannot dominate. ref_logp None (or kl_coef 0) means no KL term.
    """
    mask = mask.float()
    A = advantages.float()[:, None]  # (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped, clipped = -ratio * A, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * A
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(A < 0, torch.minimum(per_token, -dual_clip * A), per_token)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_type)
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, max_new_tokens)
    n = mask.sum().clamp(min=1).item()
    stats = {"clip_frac": ((clipped > unclipped).float() * mask).sum().item() / n,
             "ratio": (ratio * mask).sum().item() / n, "kl": (kl * mask).sum().item() / n}
    return loss, stats


# ----------------------------------------------------------------------------- data

ALIASES = {"query": ("query", "anchor"), "positive": ("positive",), "negative": ("negative", "hard_negative")}


def read_rows(path):
    """-> [(line, dict)]. JSONL is parsed here (exact line numbers); .txt is one text per line;
    Parquet, CSV and hub names go through datasets."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".txt"):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read data file {path}: {e}") from e
        if p.suffix == ".txt":
            return [(i, {"text": s}) for i, s in enumerate(lines, 1) if s.strip()]
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows += [(i, row)] if row else []
        return rows
    if p.exists() and p.suffix not in (".parquet", ".csv"):
        raise UsageError(f"data file {path}: unknown format (use .jsonl, .json, .txt, .parquet or .csv)")
    import datasets

    try:
        ds = (datasets.load_dataset(p.suffix[1:], data_files=str(p), split="train") if p.exists()
              else datasets.load_dataset(str(path), split="train"))  # else: a hub name
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        raise UsageError(f"cannot read data {path}: {(str(e).strip() or repr(e)).splitlines()[0]}") from e
    return [(i + 2 if p.suffix == ".csv" else i + 1, dict(r)) for i, r in enumerate(ds)]  # csv line 1: header


def load_records(path, mode):
    """Validated records: dicts with query/positive/negative (supervised) or text (unsupervised)."""
    if not Path(path).exists() and (str(path).startswith((".", "/")) or Path(path).suffix):
        raise UsageError(f"data file not found: {path}")
    fields = ("query", "positive", "negative") if mode == "supervised" else ("text",)
    records = []
    for line, row in read_rows(path):
        rec = {}
        for field in fields:
            names = ALIASES.get(field, (field,))
            value = next((row[n] for n in names if n in row), None)
            if isinstance(value, list) and field == "negative":  # a list of negatives: the first
                value = value[0] if value else None
            where = f"{path}:{line}: field '{field}'" + (f" (or '{names[1]}')" if len(names) > 1 else "")
            if value is None:
                raise UsageError(f"{where} is missing")
            if not isinstance(value, str):
                raise UsageError(f"{where} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise UsageError(f"{where} is empty")
            rec[field] = value
        records.append(rec)
    if not records:
        raise UsageError(f"data {path} holds no records")
    return records


def load_sts_pairs(path, n):
    """The first n (sentence1, sentence2, score) rows of an STS JSONL file, for --eval-every."""
    pairs = []
    for line, row in read_rows(path):
        if len(pairs) == n:
            break
        for field, kind in (("sentence1", str), ("sentence2", str), ("score", (int, float))):
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                what = "is missing" if field not in row else f"has {type(row[field]).__name__} {row[field]!r}"
                raise UsageError(f"{path}:{line}: field '{field}' {what}")
        pairs.append((row["sentence1"], row["sentence2"], float(row["score"])))
    if len(pairs) < 2:
        raise UsageError(f"--eval-data {path}: a Spearman correlation needs at least 2 pairs, found {len(pairs)}")
    return pairs


# ----------------------------------------------------------------------------- one step

def in_chunks(fn, rows, *tensors):
    """fn over `rows`-row slices of the tensors, concatenated: bounds activation memory on big models."""
    return torch.cat([fn(*(t[s:s + rows] for t in tensors)) for s in range(0, len(tensors[0]), rows)])


def generate(model, tok, texts, n, temperature, args, generator):
    """n rationales per text -> (Rollout, embeddings (len*n, H), prompts cut). Rows text-major."""
    ids, mask, start, cut = policy.build_prompts(tok, texts, max_length=args.max_prompt_tokens, return_truncated=True)
    ids, mask, start = (x.repeat_interleave(n, 0).to(args.device) for x in (ids, mask, start))
    # With --top-p < 1 rollouts come from the nucleus, but old, new and ref log-probs all score the full
    # softmax(logits / T): the ratio stays consistent (as in TRL and verl); only the sampler is truncated.
    with policy.autocast(ids.device):  # bf16 on GPU, as the scoring forwards that follow
        ro = rollout.sample(model, ids, mask, args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                            eos_token_id=policy.stop_token_ids(model, tok),
                            pad_token_id=tok.pad_token_id, generator=generator)
    pool = policy.pool_mask_from(ro.attention_mask, start)  # text + rationale, no system prompt, no padding
    emb = in_chunks(lambda *t: policy.embed(model, *t), args.micro_batch_size * args.group_size,
                    ro.sequences, ro.attention_mask, pool)
    return ro, emb, int(cut.sum())


def compute_rewards(args, q, main, neg, truncated):
    kw = dict(temperature=args.tau, truncated=truncated, length_penalty=not args.no_length_penalty)
    if args.reward == "infonce":
        return reward.infonce_rewards(q, main, neg, args.group_size, **kw)
    kw.update(with_scale=not args.no_scale, clustering_weight=args.clustering_weight,
              cross_group_weight=args.cross_group_weight)
    if args.mode == "unsupervised":
        return reward.unsupervised_rewards(q, main, args.group_size, **kw)
    return reward.grace_rewards(q, main, neg, args.group_size, **kw)


def diagnostics(main, parts, G, ro):
    """Collapse (cosine between different texts), diversity (within a group), and per reward term the
    share of its variance that is within groups: the only part a group baseline passes to the advantage."""
    n = main.shape[0] // G
    sims = main @ main.T  # (N, N)
    group = torch.arange(main.shape[0], device=main.device) // G
    same = group[:, None] == group[None, :]
    eye = torch.eye(len(group), dtype=torch.bool, device=main.device)
    out = {"cos_between_texts": sims[~same].mean().item() if n > 1 else float("nan"),
           "cos_within_group": sims[same & ~eye].mean().item() if G > 1 else float("nan")}
    for k, v in parts.items():
        if k != "truncated":
            total = v.var(unbiased=False).item()
            within = v.reshape(n, G).var(-1, unbiased=False).mean().item()
            out[f"within_share/{k}"] = within / total if total > 1e-12 else 0.0
    distinct = [len(set(s[m.bool()].tolist())) / max(1, int(m.sum())) for s, m in zip(ro.sequences, ro.completion_mask)]
    out["distinct_token_ratio"] = sum(distinct) / len(distinct)
    return out


@torch.no_grad()
def score(model, ref, tok, batch, args, generator):
    """Rollouts, embeddings, rewards, advantages, old and reference log-probs, all without gradient.
    -> (main Rollout, advantages (N,), old logp (N, L), ref logp (N, L) or None, metrics)."""
    G, rows = args.group_size, args.micro_batch_size * args.group_size
    t0 = time.perf_counter()
    supervised = args.mode == "supervised"
    texts = [r["positive" if supervised else "text"] for r in batch]
    main_ro, main, cut = generate(model, tok, texts, G, args.temperature, args, generator)
    # one low-temperature rationale each for the query and the negative, shared by the whole group;
    # unsupervised, the text's own one plays the query
    side = [r["query"] for r in batch] + [r["negative"] for r in batch] if supervised else texts
    _, side_emb, cut2 = generate(model, tok, side, 1, 0.5, args, generator)
    q = side_emb[:len(batch)]
    neg = side_emb[len(batch):].repeat_interleave(G, 0) if supervised else None
    t1 = time.perf_counter()
    rewards, parts = compute_rewards(args, q.repeat_interleave(G, 0), main, neg, main_ro.truncated)
    adv = group_advantages(rewards, G, args.scale_adv_by_std)
    seqs, am, cm = main_ro.sequences, main_ro.attention_mask, main_ro.completion_mask
    # score what was sampled: the same temperature (logits / T) as the rollouts
    def logprobs(m):
        return in_chunks(lambda *t: policy.token_logprobs(m, *t, temperature=args.temperature), rows, seqs, am, cm)

    old, ref_lp = logprobs(model), (logprobs(ref) if ref is not None else None)
    m = dict(reward=rewards.mean().item(), **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
             adv_abs=adv.abs().mean().item(), adv_std=adv.std(unbiased=False).item(),
             rationale_len=cm.sum(-1).float().mean().item(), truncated_frac=main_ro.truncated.float().mean().item(),
             prompts_cut=cut + cut2, t_rollout=t1 - t0, t_score=time.perf_counter() - t1,
             tokens_per_s=cm.sum().item() / (t1 - t0), **diagnostics(main, parts, G, main_ro))
    return main_ro, adv, old, ref_lp, m


def update(model, opt, ro, adv, old, ref_lp, args, world):
    """--ppo-epochs passes, one optimizer step per mini-batch (after the first the data is off-policy,
    which is where the clip acts), each accumulated over micro-batches. -> mean loss statistics."""
    seqs, am, cm = ro.sequences, ro.attention_mask, ro.completion_mask
    stats, N = [], len(seqs)
    rows, micro = args.mini_batch_size * args.group_size, args.micro_batch_size * args.group_size
    for _ in range(args.ppo_epochs):
        for s in range(0, N, rows):
            e = min(s + rows, N)
            opt.zero_grad(set_to_none=True)
            for u in range(s, e, micro):
                mu = slice(u, min(u + micro, e))
                lp = policy.token_logprobs(model, seqs[mu], am[mu], cm[mu], temperature=args.temperature)
                loss, st = policy_loss(lp, old[mu], None if ref_lp is None else ref_lp[mu], adv[mu], cm[mu],
                                       clip_eps=args.clip_eps, kl_coef=args.kl_coef, kl_type=args.kl_type,
                                       aggregation=args.aggregation, max_new_tokens=args.max_new_tokens)
                # weight each micro-batch so that the sum is the mini-batch's own aggregate
                token_mean = args.aggregation == "token"
                share = cm[mu].sum() / cm[s:e].sum().clamp(min=1) if token_mean else (mu.stop - u) / (e - s)
                (loss * share).backward()
                stats.append(dict(st, loss=loss.item()))
            if world > 1:
                # Data parallelism by hand: policy.token_logprobs calls model.base_model and the output
                # head directly, so a DDP wrapper's hooks would never fire. Averaging the gradients is
                # all DDP would do here (ranks start from the same weights and take the same steps).
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            opt.step()
    return dict({k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}, grad_norm=grad_norm)


def train_step(model, ref, tok, opt, batch, args, generator, world):
    """One rollout batch -> metrics, and (record, rationale) of its first main rollout for the log."""
    model.eval()  # rollouts use the KV cache, which gradient checkpointing (train mode) would switch off
    ro, adv, old, ref_lp, m = score(model, ref, tok, batch, args, generator)
    model.train(args.grad_checkpointing)  # HF checkpoints only in train mode; dropout is 0 either way
    t = time.perf_counter()
    m.update(update(model, opt, ro, adv, old, ref_lp, args, world), t_update=time.perf_counter() - t,
             peak_mem_mb=(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    model.eval()
    return m, (batch[0], tok.decode(ro.sequences[0][ro.completion_mask[0].bool()]))


def disable_dropout(model):
    """RL scores the same tokens several times (sampling, old, new): dropout would make them disagree."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ----------------------------------------------------------------------------- quick STS eval

def _ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    _, inv = torch.unique(x, return_inverse=True)
    return (torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, ranks) / torch.bincount(inv))[inv]


@torch.no_grad()
def sts_spearman(model, tok, pairs, args):
    """Spearman of cos(h1, h2) against the gold scores, greedy rationales: a quick in-training check
    (evaluate.py is the real evaluation; train.py does not import it)."""
    texts = [p[0] for p in pairs] + [p[1] for p in pairs]
    e = torch.cat([generate(model, tok, texts[s:s + 32], 1, 0.0, args, None)[1] for s in range(0, len(texts), 32)])
    e = e.double().cpu()
    return spearman((e[:len(pairs)] * e[len(pairs):]).sum(-1), torch.tensor([p[2] for p in pairs]))


def spearman(x, y):
    """rho = Pearson correlation of the (average) ranks of x and y."""
    a, b = _ranks(x.double()), _ranks(y.double())
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out):
    """OUT/step-N folders, oldest first."""
    return sorted((p for p in Path(out).glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def save_checkpoint(out, model, tok, opt, state):
    """OUT/step-N/: from_pretrained-loadable model + tokenizer and trainer_state.pt, renamed into
    place only once complete, so a kill never leaves a half-written checkpoint."""
    final, tmp = Path(out) / f"step-{state['step']}", Path(out) / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(dict(state, optimizer=opt.state_dict()), tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# Settings a resumed run may change without becoming another run (all others are compared and reported).
RESUME_MAY_CHANGE = {"resume", "steps", "epochs", "out", "device", "save_every", "log_rationales", "eval_every",
                     "eval_pairs", "eval_data"}


def metrics_step(line):
    """The step of one metrics.jsonl line; a line a kill cut short counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def rng_state(generator):
    return dict(torch=torch.get_rng_state(), python=random.getstate(), sampler=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s, generator):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"]), generator.set_state(s["sampler"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="tiny", help="causal LM folder or hub name, or 'tiny' (built offline)")
    a("--data", default=str(SAMPLE_DATA), help="JSONL / Parquet / CSV / .txt file, or a datasets hub name")
    a("--mode", choices=["supervised", "unsupervised"], default="supervised")
    a("--out", default="out", help="checkpoints out/step-N/ and out/metrics.jsonl")
    a("--steps", type=int, help="rollout batches to train on (default: --epochs' worth; tiny: 20)")
    a("--epochs", type=int, help="passes over the data when --steps is not given (release: 2)")
    a("--batch-size", type=int, help="texts per rollout batch, all ranks together (release: 64; tiny: 8)")
    a("--group-size", type=int, help="G rationales per text (release: 8; tiny: 4)")
    a("--mini-batch-size", type=int, help="texts per optimizer step, per rank (release: 16; tiny: 4)")
    a("--micro-batch-size", type=int, help="texts per forward/backward: gradient accumulation (default: mini batch)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--max-prompt-tokens", type=int, default=1024)
    a("--max-new-tokens", type=int, help="rationale length limit (release: 2048; tiny: 24)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the main rollouts")
    a("--top-p", type=float, default=1.0, help="nucleus of the main rollouts (log-probs are scored unfiltered)")
    a("--lr", type=float, help="AdamW learning rate, constant (release: 1e-6; tiny: 3e-4)")
    a("--weight-decay", type=float, default=0.01)
    a("--max-grad-norm", type=float, default=1.0)
    a("--kl-coef", type=float, default=0.001, help="KL penalty weight; 0 = the release (no reference model)")
    a("--kl-type", choices=["k1", "k2", "k3"], default="k3",
      help="KL estimator in the loss. Its gradient: k1 has E[grad] = 0 (regularises nothing in the loss; "
           "k1 belongs in the reward, where it gives the unbiased reverse-KL gradient); k2 gives the "
           "reverse-KL gradient; k3 (the release's 'low_var_kl') the forward-KL gradient")
    a("--clip-eps", type=float, default=0.2)
    a("--aggregation", choices=["token", "sequence", "constant"], default="token",
      help="loss mean over all tokens | per sequence then rows | Dr.GRPO's sum / (B * max_new_tokens)")
    a("--scale-adv-by-std", action="store_true", help="divide advantages by the group std (GRPO; the release does not)")
    a("--reward", choices=["release", "infonce"], default="release", help="GRACE's or per-rollout InfoNCE")
    a("--tau", type=float, default=0.1, help="similarity temperature of the reward")
    a("--no-scale", action="store_true", help="do not divide reward terms by tau (release: with_scale on)")
    a("--clustering-weight", type=float, default=0.2)
    a("--cross-group-weight", type=float, default=0.2)
    a("--no-length-penalty", action="store_true", help="no -1 reward for rationales cut at --max-new-tokens")
    a("--save-every", type=int, default=10)
    a("--resume", nargs="?", const="latest", help="continue from the newest OUT/step-N (or from this folder)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--grad-checkpointing", action="store_true")
    a("--log-rationales", type=int, default=10, help="print a text and its rationale every N steps (0: never)")
    a("--eval-every", type=int, default=0, help="STS Benchmark dev Spearman on --eval-pairs pairs every N steps")
    a("--eval-pairs", type=int, default=200)
    a("--eval-data", default=str(STS_DEV), help="JSONL with sentence1, sentence2, score")
    args = p.parse_args(argv)
    for k, v in (TINY if args.model == "tiny" else RELEASE).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.micro_batch_size = args.micro_batch_size or args.mini_batch_size
    at_least = dict(batch_size=1, group_size=1, mini_batch_size=1, micro_batch_size=1, ppo_epochs=1, steps=1,
                    epochs=1, max_prompt_tokens=1, max_new_tokens=1, save_every=1, eval_pairs=2, eval_every=0,
                    log_rationales=0, lr=0, weight_decay=0, kl_coef=0)
    positive = ("temperature", "top_p", "tau", "clip_eps", "max_grad_norm")
    for k, low in at_least.items():
        if getattr(args, k) is not None and getattr(args, k) < low:
            p.error(f"--{k.replace('_', '-')} must be at least {low}, got {getattr(args, k)}")
    for k in positive:
        if not getattr(args, k) > 0:
            p.error(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    if args.top_p > 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE: one process per GPU (nccl) or per CPU worker (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), dist.get_world_size()


def prepare(args, world):
    """Everything that can fail on bad input, before anything is written."""
    records = load_records(args.data, args.mode)
    resume_from = None
    if args.resume:
        found = checkpoints(args.out) if args.resume == "latest" else [Path(args.resume)]
        if not found or not (found[-1] / "trainer_state.pt").exists():
            raise UsageError(f"--resume: no checkpoint in {args.out if args.resume == 'latest' else args.resume}")
        resume_from = found[-1]
    elif checkpoints(args.out) or (Path(args.out) / "metrics.jsonl").exists():
        raise UsageError(f"{args.out}/ already holds a run; pass --resume to continue it, or --out NEW_DIR")
    try:
        model, tok = policy.load(resume_from or args.model, device=args.device, seed=args.seed)
        ref = policy.load(args.model, device=args.device, seed=args.seed)[0] if args.kl_coef else None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    if args.batch_size > len(records) or args.batch_size % world or args.batch_size // world % args.mini_batch_size:
        raise UsageError(f"--batch-size {args.batch_size} must be at most the {len(records)} records and split into "
                         f"{world} process(es) x whole mini-batches of --mini-batch-size {args.mini_batch_size}")
    args.steps = args.steps or max(1, args.epochs * len(records) // args.batch_size)
    try:  # the prompt template alone must fit --max-prompt-tokens
        policy.build_prompts(tok, ["x"], max_length=args.max_prompt_tokens)
    except ValueError as e:
        raise UsageError(f"--max-prompt-tokens {args.max_prompt_tokens}: {e}") from e
    sts = None
    if args.eval_every and Path(args.eval_data).exists():
        sts = load_sts_pairs(args.eval_data, args.eval_pairs)
    elif args.eval_every and args.eval_data != str(STS_DEV):  # the default lives in ../shared: may be absent
        raise UsageError(f"--eval-data {args.eval_data}: file not found")
    return records, model, tok, ref, resume_from, sts


def run(args):
    rank, world = setup_distributed(args)
    records, model, tok, ref, resume_from, sts = prepare(args, world)
    torch.manual_seed(args.seed), random.seed(args.seed)
    disable_dropout(model)
    if ref is not None:
        ref.eval().requires_grad_(False)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # each rank its own samples
    state = dict(step=0, epoch=0, position=0, prompts_cut=0)
    out = Path(args.out)
    if resume_from is not None:
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(saved["optimizer"])
        if len(saved["rng"]) == world:  # (with another number of processes the fresh seeds stand)
            set_rng_state(saved["rng"][rank], generator)
        state.update({k: saved[k] for k in state})
        changed = {k: (v, vars(args)[k]) for k, v in saved.get("args", {}).items()
                   if k not in RESUME_MAY_CHANGE and vars(args).get(k, v) != v}
        if changed and rank == 0:
            print("note: resuming with settings that differ from the saved run: "
                  + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items()), flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and (out / "metrics.jsonl").exists():  # drop the steps the resumed run redoes
            lines = (out / "metrics.jsonl").read_text().splitlines()
            keep = [line for line in lines if metrics_step(line) <= state["step"]]
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in keep))
        print(f"grace: {args.mode} on {len(records)} records, model {args.model}, {args.steps} steps of "
              f"{args.batch_size} texts x G={args.group_size}, {world} process(es) on {args.device}", flush=True)
    if args.eval_every and sts is None and rank == 0:
        print(f"note: --eval-every skipped: {args.eval_data} not found", flush=True)

    def save():
        rngs = [rng_state(generator)]
        if world > 1:  # every rank's RNG states: each resumes its own sampling stream
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(generator))
        if rank == 0:
            save_checkpoint(out, model, tok, opt, dict(state, rng=rngs, args=vars(args)))
        if world > 1:
            dist.barrier()

    # Ctrl-C (or SIGTERM: torchrun's stop, a cluster's preemption) finishes the current step, saves it and
    # exits: a checkpoint taken mid-update would hold weights between two steps and could never be resumed
    # exactly. A second signal aborts at once.
    stop = []

    def on_sigint(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(1)
        tqdm.write("stopping: finishing this step, then saving (Ctrl-C again aborts without saving)")

    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=args.steps, initial=state["step"], disable=rank != 0, dynamic_ncols=True)
    try:
        while state["step"] < args.steps:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
            if state["position"] + args.batch_size > len(order):  # next epoch: a fresh shuffle, from the seed
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                continue
            local = args.batch_size // world  # shard by group: each rank rolls out and rewards its own texts
            idx = order[state["position"]:state["position"] + args.batch_size][rank * local:(rank + 1) * local]
            batch = [records[i] for i in idx]
            metrics, (text, rationale) = train_step(model, ref, tok, opt, batch, args, generator, world)
            state["step"] += 1
            state["position"] += args.batch_size
            if sts is not None and state["step"] % args.eval_every == 0:
                metrics["sts_dev_spearman"] = sts_spearman(model, tok, sts, args)
            metrics["stop"] = float(bool(stop))
            if world > 1:  # every metric averaged over ranks (a Ctrl-C on any rank stops them all)
                vals = torch.tensor(list(metrics.values()), dtype=torch.float64)
                dist.all_reduce(vals)
                metrics = dict(zip(metrics, (vals / world).tolist()))
            state["prompts_cut"] += round(metrics.pop("prompts_cut") * world)
            stopping = metrics.pop("stop") > 0
            if rank == 0:
                metrics = dict(step=state["step"], epoch=state["epoch"], **metrics)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                                loss=f"{metrics['loss']:.4f}", collapse=f"{metrics['cos_between_texts']:.2f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
                if args.log_rationales and state["step"] % args.log_rationales == 0:
                    tqdm.write(f"[step {state['step']}] text: {text.get('positive', text.get('text'))[:200]}\n"
                               f"  rationale: {rationale[:400]!r}")
            if stopping or state["step"] % args.save_every == 0 or state["step"] == args.steps:
                save()
            if stopping:
                if rank == 0:
                    tqdm.write(f"interrupted: saved {out}/step-{state['step']}; --resume continues from it")
                raise KeyboardInterrupt
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rank == 0:
        print(f"done: {out}/step-{state['step']}  (metrics: {out}/metrics.jsonl)")
        if state["prompts_cut"]:
            print(f"note: {state['prompts_cut']} prompts were cut to --max-prompt-tokens {args.max_prompt_tokens}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
