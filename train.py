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
"""
import argparse
import json
import os
import random
import resource
import shutil
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
# The authors' release (Qwen2.5-1.5B-Instruct on 4 x H100) and a CPU-sized demo for the built-in tiny model.
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
    """Per-token KL(pi || ref) estimates from samples of pi; d = ref_logp - logp.
    k1 = -d,  k2 = d^2 / 2,  k3 = exp(d) - d - 1 (non-negative, low variance)."""
    d = ref_logp - logp
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d ** 2
    if kl_type == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_type must be k1, k2 or k3, got {kl_type!r}")


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
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -dual_clip * A), pg)
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_type)
        per_token = pg + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, max_new_tokens)
    n = mask.sum().clamp(min=1)
    stats = {"clip_frac": ((clipped > unclipped).float() * mask).sum().item() / n.item(),
             "ratio": ((ratio * mask).sum() / n).item(), "kl": ((kl * mask).sum() / n).item()}
    return loss, stats


# ----------------------------------------------------------------------------- data

ALIASES = {"query": ("query", "anchor"), "positive": ("positive",), "negative": ("negative", "hard_negative")}


def read_rows(path):
    """-> list of (line, dict). JSONL is parsed here (for exact line numbers); .txt is one text per
    line; Parquet, CSV and hub names go through datasets."""
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
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            if not isinstance(rows[-1][1], dict):
                raise UsageError(f"{path}:{i}: expected a JSON object, got {type(rows[-1][1]).__name__}")
        return rows
    import datasets

    if p.exists() and p.suffix not in (".parquet", ".csv"):
        raise UsageError(f"data file {path}: unknown format (use .jsonl, .json, .txt, .parquet or .csv)")
    try:  # a Parquet / CSV file, else a hub name
        ds = (datasets.load_dataset(p.suffix[1:], data_files=str(p), split="train") if p.exists()
              else datasets.load_dataset(str(path), split="train"))
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise UsageError(f"cannot read data {path}: {reason}") from e
    return [(i + 2 if p.suffix == ".csv" else i + 1, dict(r)) for i, r in enumerate(ds)]  # csv: line 1 = header


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


# ----------------------------------------------------------------------------- one step

def generate(model, tok, texts, n, temperature, args, generator):
    """n rationales per text -> (Rollout, embeddings (len*n, H), prompts cut). Rows text-major."""
    ids, mask, start, cut = policy.build_prompts(tok, texts, max_length=args.max_prompt_tokens, return_truncated=True)
    ids, mask, start = (x.repeat_interleave(n, 0).to(args.device) for x in (ids, mask, start))
    ro = rollout.sample(model, ids, mask, args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                        eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, generator=generator)
    emb = policy.embed(model, ro.sequences, ro.attention_mask, policy.pool_mask_from(ro.attention_mask, start))
    return ro, emb, int(cut.sum())


def compute_rewards(args, q, main, neg, truncated):
    G = args.group_size
    kw = dict(temperature=args.tau, truncated=truncated, length_penalty=not args.no_length_penalty)
    if args.reward == "infonce":
        return reward.infonce_rewards(q, main, neg, G, **kw)
    kw.update(with_scale=not args.no_scale, clustering_weight=args.clustering_weight,
              cross_group_weight=args.cross_group_weight)
    if args.mode == "unsupervised":
        return reward.unsupervised_rewards(q, main, G, **kw)
    return reward.grace_rewards(q, main, neg, G, **kw)


def diagnostics(main, parts, G, ro):
    """Collapse and diversity of the embeddings, and the share of each reward term that reaches the advantage."""
    n = main.shape[0] // G
    sims = main @ main.T  # (N, N)
    group = torch.arange(main.shape[0], device=main.device) // G
    same = group[:, None] == group[None, :]
    eye = torch.eye(len(group), dtype=torch.bool, device=main.device)
    out = {"cos_between_texts": sims[~same].mean().item() if n > 1 else float("nan"),
           "cos_within_group": sims[same & ~eye].mean().item() if G > 1 else float("nan")}
    for k, v in parts.items():  # within-group share of variance: the part a group baseline keeps
        if k != "truncated":
            total = v.var(unbiased=False).item()
            within = v.reshape(n, G).var(-1, unbiased=False).mean().item()
            out[f"within_share/{k}"] = within / total if total > 1e-12 else 0.0
    lengths = ro.completion_mask.sum(-1).clamp(min=1)
    distinct = [len(set(s[m.bool()].tolist())) for s, m in zip(ro.sequences, ro.completion_mask)]
    out["distinct_token_ratio"] = (torch.tensor(distinct, dtype=torch.float) / lengths.cpu()).mean().item()
    return out


def score(model, ref, tok, batch, args, generator):
    """Rollouts, embeddings, rewards, advantages and the old/reference log-probs: all without gradient.
    -> (main Rollout, advantages (N,), old logp (N, T), ref logp or None, metrics)."""
    G = args.group_size
    t0 = time.perf_counter()
    if args.mode == "supervised":
        main_ro, main, cut = generate(model, tok, [r["positive"] for r in batch], G, args.temperature, args, generator)
        side = [r["query"] for r in batch] + [r["negative"] for r in batch]  # one each, shared by the group
        _, side_emb, cut2 = generate(model, tok, side, 1, 0.5, args, generator)
        q, neg = side_emb[:len(batch)], side_emb[len(batch):].repeat_interleave(G, 0)
    else:  # the text's own low-temperature rationale plays the query
        main_ro, main, cut = generate(model, tok, [r["text"] for r in batch], G, args.temperature, args, generator)
        _, q, cut2 = generate(model, tok, [r["text"] for r in batch], 1, 0.5, args, generator)
        neg = None
    t1 = time.perf_counter()
    rewards, parts = compute_rewards(args, q.repeat_interleave(G, 0), main, neg, main_ro.truncated)
    adv = group_advantages(rewards, G, args.scale_adv_by_std)
    seqs, am, cm = main_ro.sequences, main_ro.attention_mask, main_ro.completion_mask
    old = policy.token_logprobs(model, seqs, am, cm, temperature=args.temperature)  # score what was sampled
    ref_lp = policy.token_logprobs(ref, seqs, am, cm, temperature=args.temperature) if ref is not None else None
    m = dict(reward=rewards.mean().item(), **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
             adv_abs=adv.abs().mean().item(), adv_std=adv.std().item() if len(adv) > 1 else 0.0,
             rationale_len=cm.sum(-1).float().mean().item(), truncated_frac=main_ro.truncated.float().mean().item(),
             prompts_cut=cut + cut2, t_rollout=t1 - t0, t_score=time.perf_counter() - t1,
             tokens_per_s=cm.sum().item() / (t1 - t0), **diagnostics(main, parts, G, main_ro))
    return main_ro, adv, old, ref_lp, m


def update(model, opt, ro, adv, old, ref_lp, args, world):
    """--ppo-epochs passes of one optimizer step per mini-batch (later mini-batches are off-policy,
    which is where the clip acts), each accumulated over micro-batches. -> averaged loss stats."""
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
                # weight each micro-batch so that their sum is the mini-batch's own aggregate
                token_mean = args.aggregation == "token"
                share = cm[mu].sum() / cm[s:e].sum().clamp(min=1) if token_mean else (mu.stop - u) / (e - s)
                (loss * share).backward()
                stats.append(dict(st, loss=loss.item()))
            if world > 1:  # average gradients over ranks by hand: the plainest correct data parallelism
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            opt.step()
    return dict({k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}, grad_norm=grad_norm)


def train_step(model, ref, tok, opt, batch, args, generator, world):
    """One rollout batch -> metrics, and (record, rationale) of its first main rollout for the log."""
    model.eval()  # dropout is disabled anyway (disable_dropout); eval keeps gradient checkpointing off here
    with torch.no_grad():
        ro, adv, old, ref_lp, m = score(model, ref, tok, batch, args, generator)
    model.train()  # only lets gradient checkpointing act: dropout stays off
    t = time.perf_counter()
    m.update(update(model, opt, ro, adv, old, ref_lp, args, world), t_update=time.perf_counter() - t,
             peak_mem_mb=(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return m, (batch[0], tok.decode(ro.sequences[0][ro.completion_mask[0].bool()]))


# ----------------------------------------------------------------------------- quick STS eval

def _ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    _, inv = torch.unique(x, return_inverse=True)
    return (torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, ranks) / torch.bincount(inv))[inv]


def sts_spearman(model, tok, pairs, args):
    """Spearman of cos(h1, h2) against gold scores, with greedy rationales (a quick in-training check)."""
    texts = [p[0] for p in pairs] + [p[1] for p in pairs]
    embs = []
    with torch.no_grad():
        for s in range(0, len(texts), 32):
            embs.append(generate(model, tok, texts[s:s + 32], 1, 0.0, args, None)[1])
    e = torch.cat(embs).double().cpu()
    return spearman((e[:len(pairs)] * e[len(pairs):]).sum(-1), torch.tensor([p[2] for p in pairs]))


def spearman(x, y):
    """rho = Pearson correlation of the (average) ranks of x and y."""
    a, b = _ranks(x.double()), _ranks(y.double())
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out):
    """OUT/step-N folders, oldest first."""
    found = [p for p in Path(out).glob("step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(out, model, tok, opt, state):
    """OUT/step-N/: from_pretrained-loadable model + tokenizer and trainer_state.pt, renamed into
    place only once complete, so a kill never leaves a half-written checkpoint."""
    final = Path(out) / f"step-{state['step']}"
    tmp = Path(out) / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(dict(state, optimizer=opt.state_dict()), tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def rng_state(generator):
    return dict(torch=torch.get_rng_state(), python=random.getstate(), sampler=generator.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s, generator):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"]), generator.set_state(s["sampler"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def disable_dropout(model):
    """RL scores the same tokens several times (sampling, old, new): dropout would make them disagree."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="tiny", help="causal LM folder or hub name, or 'tiny' (built offline)")
    a("--data", default=str(SAMPLE_DATA), help="JSONL / Parquet / CSV / .txt file, or a datasets hub name")
    a("--mode", choices=["supervised", "unsupervised"], default="supervised")
    a("--out", default="out", help="checkpoints out/step-N/ and out/metrics.jsonl")
    a("--steps", type=int, help="optimizer steps over rollout batches (default: --epochs' worth; tiny: 20)")
    a("--epochs", type=int, help="passes over the data (release: 2)")
    a("--batch-size", type=int, help="texts per rollout batch, all ranks together (release: 64; tiny: 8)")
    a("--group-size", type=int, help="G rationales per text (release: 8; tiny: 4)")
    a("--mini-batch-size", type=int, help="texts per optimizer step within a rollout batch (release: 16; tiny: 4)")
    a("--micro-batch-size", type=int, default=None, help="texts per forward/backward (gradient accumulation; default: mini batch)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--max-prompt-tokens", type=int, default=1024)
    a("--max-new-tokens", type=int, help="rationale length limit (release: 2048; tiny: 24)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the main rollouts")
    a("--top-p", type=float, default=1.0)
    a("--lr", type=float, help="AdamW learning rate (release: 1e-6; tiny: 3e-4)")
    a("--weight-decay", type=float, default=0.01)
    a("--max-grad-norm", type=float, default=1.0)
    a("--kl-coef", type=float, default=0.001, help="KL penalty weight; 0 reproduces the release and skips the reference model")
    a("--kl-type", choices=["k1", "k2", "k3"], default="k3",
      help="KL estimator in the loss. Its gradient: k1 has E[grad] = 0 (regularises nothing in the loss; "
           "k1 belongs in the reward, where it gives the unbiased reverse-KL gradient); k2 gives the "
           "reverse-KL gradient; k3 (the release's 'low_var_kl') the forward-KL gradient")
    a("--clip-eps", type=float, default=0.2)
    a("--aggregation", choices=["token", "sequence", "constant"], default="token",
      help="loss mean over all tokens | per sequence then rows | Dr.GRPO's sum / (B * max_new_tokens)")
    a("--scale-adv-by-std", action="store_true", help="divide advantages by the group std (GRPO; the release does not)")
    a("--reward", choices=["release", "infonce"], default="release", help="GRACE's reward or the per-rollout InfoNCE one")
    a("--tau", type=float, default=0.1, help="similarity temperature of the reward")
    a("--no-scale", action="store_true", help="do not divide reward terms by tau (release: with_scale on)")
    a("--clustering-weight", type=float, default=0.2)
    a("--cross-group-weight", type=float, default=0.2)
    a("--no-length-penalty", action="store_true", help="no -1 reward for rationales cut at --max-new-tokens")
    a("--save-every", type=int, default=10)
    a("--resume", nargs="?", const="latest", help="continue from the newest out/step-N (or this folder)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--grad-checkpointing", action="store_true")
    a("--log-rationales", type=int, default=10, help="print a text and its rationale every N steps (0: never)")
    a("--eval-every", type=int, default=0, help="STS Benchmark dev Spearman on --eval-pairs pairs every N steps")
    a("--eval-pairs", type=int, default=200)
    a("--eval-data", default=str(STS_DEV))
    args = p.parse_args(argv)
    for k, v in (TINY if args.model == "tiny" else RELEASE).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.micro_batch_size = args.micro_batch_size or args.mini_batch_size
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


def prepare(args, rank, world):
    """Everything that can fail on bad input, before anything is written."""
    records = load_records(args.data, args.mode)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if args.batch_size // world % args.mini_batch_size:
        raise UsageError(f"--mini-batch-size {args.mini_batch_size} must divide the per-process batch {args.batch_size // world}")
    if args.steps is None:
        args.steps = max(1, args.epochs * len(records) // args.batch_size)
    resume_from = None
    if args.resume:
        found = [Path(args.resume)] if args.resume != "latest" else checkpoints(args.out)
        if not found or not (found[-1] / "trainer_state.pt").exists():
            raise UsageError(f"--resume: no checkpoint in {args.resume if args.resume != 'latest' else args.out}")
        resume_from = found[-1]
    elif checkpoints(args.out) or (Path(args.out) / "metrics.jsonl").exists():
        raise UsageError(f"{args.out}/ already holds a run; pass --resume to continue it, or --out NEW_DIR")
    try:
        model, tok = policy.load(resume_from or args.model, device=args.device, seed=args.seed)
        ref = policy.load(args.model, device=args.device, seed=args.seed)[0] if args.kl_coef else None
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    return records, model, tok, ref, resume_from


def run(args):
    rank, world = setup_distributed(args)
    records, model, tok, ref, resume_from = prepare(args, rank, world)
    torch.manual_seed(args.seed), random.seed(args.seed)
    disable_dropout(model)
    if ref is not None:
        ref.eval().requires_grad_(False)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # each rank its own samples
    state = dict(step=0, epoch=0, position=0, prompts_cut=0)
    if resume_from is not None:
        saved = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(saved.pop("optimizer"))
        set_rng_state(saved["rng"][rank] if isinstance(saved["rng"], list) else saved["rng"], generator)
        state.update({k: saved[k] for k in state})
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and (out / "metrics.jsonl").exists():  # drop steps the resumed run redoes
            keep = [l for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= state["step"]]
            (out / "metrics.jsonl").write_text("".join(l + "\n" for l in keep))
        print(f"grace: {args.mode} GRACE on {len(records)} records, model {args.model}, {args.steps} steps of "
              f"{args.batch_size} texts x G={args.group_size}, {world} process(es) on {args.device}", flush=True)
    sts = None
    if args.eval_every:
        if Path(args.eval_data).exists():
            rows = [json.loads(l) for l in Path(args.eval_data).read_text().splitlines()[:args.eval_pairs]]
            sts = [(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]
        elif rank == 0:
            print(f"note: --eval-every skipped: {args.eval_data} not found", flush=True)
    local = args.batch_size // world

    def save():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state(generator))
        else:
            rngs = [rng_state(generator)]
        if rank == 0:
            save_checkpoint(out, model, tok, opt, dict(state, rng=rngs, args=vars(args)))
        if world > 1:
            dist.barrier()

    bar = tqdm(total=args.steps, initial=state["step"], disable=rank != 0, dynamic_ncols=True)
    try:
        while state["step"] < args.steps:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
            if state["position"] + args.batch_size > len(order):  # next epoch: a fresh shuffle, from the seed
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                continue
            idx = order[state["position"]:state["position"] + args.batch_size][rank * local:(rank + 1) * local]
            metrics, (text, rationale) = train_step(model, ref, tok, opt, [records[i] for i in idx], args, generator, world)
            state["step"] += 1
            state["position"] += args.batch_size
            state["prompts_cut"] += metrics.pop("prompts_cut")
            if sts is not None and state["step"] % args.eval_every == 0:
                metrics["sts_dev_spearman"] = sts_spearman(model.eval(), tok, sts, args)
            if world > 1:  # average every metric over ranks
                vals = torch.tensor(list(metrics.values()), dtype=torch.float64)
                dist.all_reduce(vals, op=dist.ReduceOp.AVG)
                metrics = dict(zip(metrics, vals.tolist()))
            if rank == 0:
                metrics = dict(step=state["step"], epoch=state["epoch"], prompts_cut=state["prompts_cut"], **metrics)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                cos_x=f"{metrics['cos_between_texts']:.2f}")  # collapse watch
                bar.update(1)
                if args.log_rationales and state["step"] % args.log_rationales == 0:
                    shown = text.get("positive", text.get("text"))
                    tqdm.write(f"[step {state['step']}] text: {shown[:200]}\n  rationale: {rationale[:400]!r}")
            if state["step"] % args.save_every == 0 or state["step"] == args.steps:
                save()
    except KeyboardInterrupt:
        if rank == 0:
            tqdm.write(f"interrupted: saving step-{state['step']} before exiting")
        save()
        raise
    finally:
        bar.close()
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
