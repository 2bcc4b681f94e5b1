"""Train a GRACE policy: rationales -> embeddings -> contrastive rewards -> group-relative policy gradient.

    python train.py                                          # the tiny demo on CPU: 20 steps, under a minute
    python train.py --model tiny-lm --data triplets.jsonl    # the small LM pretrained here: watch it learn
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --data triples.jsonl
    torchrun --nproc_per_node=4 train.py --model ... --data ...   # data-parallel, whole groups per rank
    torchrun --nproc_per_node=8 train.py --fsdp [--offload] ...    # FSDP2: weights, grads, AdamW sharded

The objective, for a supervised record (q, p, n) and the policy pi_theta:

    y_1..y_G ~ pi_old(. | prompt(p))              G rationales of the positive: the "main" rollouts
    h_i = normalize(mean H_last[p ; y_i])          the GRACE embedding (policy.encode), no gradient
    r_i = R(h_q, h_i, h_n, group)                  one reward per main rollout (reward.py)
    A_i = r_i - mean_j r_j                         group-relative advantage (optionally / std_j r_j)
    rho_t = pi_theta(y_i,t | .) / pi_old(y_i,t | .)
    L = agg_{i,t} [ -min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) + beta k3(pi_theta, pi_ref)_t ]

h_q and h_n come from one low-temperature rationale each, shared by the group. Only log pi_theta of
the main rationales carries gradient; nothing is back-propagated through the similarities.
Unsupervised: one text per record; its own low-temperature rationale plays the query, no negative.

Deviations from the authors' release, on purpose:
 1. A KL penalty is on by default (beta = 0.001, k3); the release uses 0. --kl-coef 0 reproduces it
    and loads no reference model.
 2. When a rollout batch gets exactly one optimizer step (one mini-batch, --ppo-epochs 1), pi_old is
    the current policy: the old log-probs are the new ones detached (rho = 1 exactly), as TRL does,
    and their forward is skipped. Otherwise they come from the embedding forward (one pass, two uses).
 3. A step whose loss or gradient norm is not finite is skipped (counted in `skipped`); three in a
    row stop the run. Nothing non-finite is ever saved.
 4. Under torchrun the token-mean is taken per rank, then gradients are averaged over ranks.
 5. --objective contrastive is not GRACE: InfoNCE on the same pooled embeddings with gradients
    through the encoder, the baseline the paper does not run (same data, checkpoints and metrics).
 6. The in-training STS check (--eval-every) uses greedy rationales; the release samples at 1.0.

Precision: float32 master weights, gradients and AdamW state; on CUDA every forward (rollouts,
embeddings, log-probs) runs under bf16 autocast (policy.autocast), and the frozen reference is kept in
bf16 (it never steps). Compiled rollouts run on a decode copy with bf16 Linear weights, refreshed from
the master: the numbers autocast computes, without re-casting every weight at every token
(rollout.sampling_model). Under --fsdp every rollout runs on fsdp.decode_copy, a plain copy of the
sharded weights. CPU runs are float32 throughout.

Reading order: the math (pure functions), one step (a staged pipeline), the loop, then plumbing
(distributed setup, resume, checkpoints, the CLI) at the bottom.
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C before the loop (imports, loading): exit at once, quietly. An exception
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # would be re-wrapped by lazy imports as a traceback

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import fsdp  # noqa: E402
import policy  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402

# Defaults by preset; --preset picks one (automatic for the built-in models), and any flag overrides it.
PRESETS = {
    # The authors' release: Qwen2.5-1.5B-Instruct on 4 x H100.
    "release": dict(batch_size=64, group_size=8, mini_batch_size=16, max_new_tokens=2048, lr=1e-6, epochs=2),
    # The random 0.3M demo model: nothing moves at lr 1e-6 in 20 steps, so 3e-4.
    "tiny": dict(batch_size=8, group_size=4, mini_batch_size=4, max_new_tokens=24, lr=3e-4, steps=20),
    # The small LM of pretrain.py: bench/learning.py's setting, 30 steps in ~1.5 min (README, "Watch it learn").
    "tiny-lm": dict(batch_size=16, group_size=4, mini_batch_size=16, max_new_tokens=32, lr=1e-4, steps=30),
}
MAX_NONFINITE_IN_ROW = 3


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


def loss_normaliser(mask, how, max_new_tokens=None):
    """The denominator of `aggregate` for a batch: valid tokens | rows | rows x max_new_tokens.

    Computed once for a whole mini-batch and passed to every micro-batch's loss, so gradient
    accumulation sums to exactly the mini-batch's aggregate, whatever the micro-batch split."""
    if how == "token":
        return mask.sum().clamp(min=1).item()
    if how == "sequence":
        return mask.shape[0]
    if how == "constant":  # Dr.GRPO: a fixed number, not the padded width (which moves when rollouts stop early)
        return mask.shape[0] * max_new_tokens
    raise ValueError(f"aggregation must be token, sequence or constant, got {how!r}")


def aggregate(x, mask, how, normaliser):
    """Reduce per-token x (B, T) over mask: token: sum / tokens | sequence: sum of row means / rows |
    constant: sum / (rows x max_new_tokens), each denominator given by `loss_normaliser`."""
    x = x * mask
    if how == "sequence":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return x.sum() / normaliser


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.001, kl_type="k3",
                aggregation="token", max_new_tokens=None, dual_clip=3.0, normaliser=None):
    """Clipped policy-gradient loss + KL penalty; logp/old_logp/ref_logp/mask (B, T), advantages (B,).

    loss_t = -min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + kl_coef * k(logp_t, ref_t), rho = exp(logp - old)
    dual_clip c (verl's clip_ratio_c): for A < 0 the loss is also capped at -c A, so one token whose
    ratio exploded cannot dominate. ref_logp None (or kl_coef 0) means no KL term. normaliser: see
    loss_normaliser (default: this batch's own).
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
    if normaliser is None:
        normaliser = loss_normaliser(mask, aggregation, max_new_tokens)
    loss = aggregate(per_token, mask, aggregation, normaliser)
    n = mask.sum().clamp(min=1).item()
    stats = {"clip_frac": ((clipped > unclipped).float() * mask).sum().item() / n,
             "ratio": (ratio * mask).sum().item() / n, "kl": (kl * mask).sum().item() / n}
    return loss, stats


def contrastive_loss(query, positive, negative, tau):
    """InfoNCE with in-batch negatives: -log softmax_c(cos(q_b, c) / tau)[p_b], candidates c = every
    positive and every negative of the batch. query/positive/negative (B, H) L2-normalised, with gradient."""
    candidates = torch.cat([positive, negative]).float()  # (2B, H)
    logits = query.float() @ candidates.T / tau  # (B, 2B)
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


# ----------------------------------------------------------------------------- one step

def rl_step(model, ref, tok, opt, batch, args, generator, world):
    """One GRPO step on a batch of records -> (metrics, (record, its first rationale))."""
    G, supervised = args.group_size, args.mode == "supervised"
    on_policy = args.ppo_epochs == 1 and len(batch) == args.mini_batch_size  # one optimizer step: pi_old = pi_theta
    t0 = time.perf_counter()

    # 1. rollouts and embeddings, no gradient: G main rationales per positive (with pi_old's log-probs
    #    from the same forward, unless on-policy), one low-temperature rationale per query and negative
    texts = [r["positive" if supervised else "text"] for r in batch]
    main = encode(model, tok, texts, args, n=G, temperature=args.temperature, generator=generator,
                  logprob_temperature=None if on_policy else args.temperature)
    sides = [r["query"] for r in batch] + [r["negative"] for r in batch] if supervised else texts
    side = encode(model, tok, sides, args, n=1, temperature=args.side_temperature, generator=generator, stale=False)
    q = side.embeddings[:len(batch)].repeat_interleave(G, 0)  # (N, H): each group's query on its G rows
    neg = side.embeddings[len(batch):].repeat_interleave(G, 0) if supervised else None
    t1 = time.perf_counter()

    # 2. rewards (N,) -> advantages (N,)
    rewards, parts = reward.REWARDS[args.reward](q, main.embeddings, neg, G, temperature=args.tau,
                                                 truncated=main.rollout.truncated,
                                                 length_penalty=not args.no_length_penalty, **reward_options(args))
    adv = group_advantages(rewards, G, args.scale_adv_by_std)

    # 3. reference log-probs (N, L) of the main rationales, for the KL penalty
    rollouts, rows = main.rollout, args.micro_batch_size * G
    ref_logp = None
    if ref is not None:
        chunks = [slice(s, s + rows) for s in range(0, len(rollouts.sequences), rows)]  # bounded activations
        ref_logp = torch.cat([policy.token_logprobs(ref, rollouts.sequences[c], rollouts.attention_mask[c],
                                                    rollouts.completion_mask[c], temperature=args.temperature)
                              for c in chunks])
    t2 = time.perf_counter()

    # 4. --ppo-epochs passes of mini-batches of the clipped loss
    model.train(args.grad_checkpointing)  # HF checkpoints only in train mode; dropout is 0 either way
    stats = update(model, opt, rollouts, adv, main.logprobs, ref_logp, args, world)
    model.eval()  # rollouts use the KV cache, which gradient checkpointing (train mode) switches off
    t3 = time.perf_counter()

    about_rationales, rationales = rationale_metrics(tok, rollouts)
    metrics = dict(reward=rewards.mean().item(), **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
                   adv_abs=adv.abs().mean().item(), adv_std=adv.std(unbiased=False).item(),
                   **about_rationales, prompts_cut=int(main.prompts_cut.sum() + side.prompts_cut.sum()),
                   t_rollout=t1 - t0, t_score=t2 - t1, t_update=t3 - t2,
                   tokens_per_s=rollouts.completion_mask.sum().item() / (t1 - t0),
                   compilations=rollout.compilations(), **stats, **diagnostics(main.embeddings, parts, G, rollouts))
    return metrics, (batch[0], rationales[0])


def update(model, opt, rollouts, adv, old_logp, ref_logp, args, world):
    """--ppo-epochs passes, one optimizer step per mini-batch (after the first the data is off-policy,
    which is where the clip acts), each accumulated over micro-batches. old_logp None: on-policy.
    A step whose loss or gradient is not finite is skipped. -> mean loss statistics."""
    sequences, attention, completion = rollouts.sequences, rollouts.attention_mask, rollouts.completion_mask
    rows, micro = args.mini_batch_size * args.group_size, args.micro_batch_size * args.group_size
    stats, skipped, grad_norm = [], 0, float("nan")
    for _ in range(args.ppo_epochs):
        for start in range(0, len(sequences), rows):
            mini = slice(start, min(start + rows, len(sequences)))
            normaliser = loss_normaliser(completion[mini].float(), args.aggregation, args.max_new_tokens)
            opt.zero_grad(set_to_none=True)
            finite = True
            for s in range(mini.start, mini.stop, micro):
                r = slice(s, min(s + micro, mini.stop))  # this micro-batch's rows
                logp = policy.token_logprobs(model, sequences[r], attention[r], completion[r],
                                             temperature=args.temperature)  # (rows, T), with gradient
                old = logp.detach() if old_logp is None else old_logp[r]
                loss, loss_stats = policy_loss(logp, old, None if ref_logp is None else ref_logp[r], adv[r],
                                               completion[r], clip_eps=args.clip_eps, kl_coef=args.kl_coef,
                                               kl_type=args.kl_type, aggregation=args.aggregation,
                                               max_new_tokens=args.max_new_tokens, dual_clip=args.dual_clip,
                                               normaliser=normaliser)
                finite &= bool(torch.isfinite(loss))
                loss.backward()
                stats.append(dict(loss_stats, loss=loss.item()))
            grad_norm = step_optimizer(model, opt, args, world, finite)
            skipped += not math.isfinite(grad_norm)
    out = {k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}
    return dict(out, grad_norm=grad_norm, skipped=skipped)


def step_optimizer(model, opt, args, world, finite=True):
    """All-reduce gradients over ranks, clip, step -> the gradient norm; NaN (and no step) if not finite."""
    if world > 1 and not args.fsdp:  # (under --fsdp the reduce-scatter of backward has averaged them)
        # Data parallelism by hand: policy.token_logprobs calls model.base_model and the output head
        # directly, so a DDP wrapper's hooks would never fire. Averaging the gradients is all DDP would
        # do here (ranks start from the same weights and take the same steps).
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    grad_norm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)).item()
    if not (finite and math.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)  # skip: a NaN step would poison the weights and AdamW's moments
        return float("nan")
    opt.step()
    return grad_norm


def contrastive_step(model, ref, tok, opt, batch, args, generator, world):
    """--objective contrastive: InfoNCE on the GRACE embeddings (greedy rationales, as evaluated), with
    gradients through the encoder's hidden states instead of through rationale log-probs."""
    B = len(batch)
    t0 = time.perf_counter()
    texts = [r["query"] for r in batch] + [r["positive"] for r in batch] + [r["negative"] for r in batch]
    encoded = encode(model, tok, texts, args, n=1, temperature=0.0, generator=None)  # rationales: no gradient
    t1 = time.perf_counter()
    model.train(args.grad_checkpointing)
    rollouts = encoded.rollout
    hidden = policy.hidden_states(model, rollouts.sequences, rollouts.attention_mask)  # (3B, T, H), with gradient
    emb = policy.mean_pool(hidden, encoded.pool_mask)  # (3B, H)
    loss = contrastive_loss(emb[:B], emb[B:2 * B], emb[2 * B:], args.tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = step_optimizer(model, opt, args, world, bool(torch.isfinite(loss)))
    model.eval()
    with torch.no_grad():
        accuracy = ((emb[:B] @ emb[B:].T).argmax(-1) == torch.arange(B, device=emb.device)).float().mean().item()
    about_rationales, rationales = rationale_metrics(tok, rollouts)
    metrics = dict(loss=loss.item(), accuracy=accuracy, grad_norm=grad_norm, skipped=int(not math.isfinite(grad_norm)),
                   **about_rationales, prompts_cut=int(encoded.prompts_cut.sum()), t_rollout=t1 - t0,
                   t_update=time.perf_counter() - t1, tokens_per_s=rollouts.completion_mask.sum().item() / (t1 - t0),
                   cos_between_texts=cos_between_texts(encoded.embeddings[B:2 * B]))
    return metrics, (batch[0], rationales[B])


def encode(model, tok, texts, args, stale=True, **kw):
    """policy.encode with this run's rollout settings (prompt limit, length, nucleus, compile, chunking).
    --fsdp: rationales are sampled from fsdp's decode copy, bf16 Linears on GPU, refreshed unless the
    caller says no optimizer step came since the last call (stale=False; a collective either way)."""
    sampler = None
    if args.fsdp:
        sampler = fsdp.sampler(model, args.device, policy.low_precision(args.device), stale)
    return policy.encode(model, tok, texts, max_new_tokens=args.max_new_tokens, top_p=args.top_p, top_k=args.top_k,
                         max_length=args.max_prompt_tokens, compile=args.compile == "on",
                         chunk_rows=args.micro_batch_size * args.group_size, sample_rows=args.rollout_rows or None,
                         sampler=sampler, **kw)


def reward_options(args):
    """The options of the chosen reward, from its flags (parse_args refuses flags that do not apply)."""
    given = dict(with_scale=not args.no_scale, clustering_weight=args.clustering_weight,
                 cross_group_weight=args.cross_group_weight)
    return {k: given[k] for k in reward.OPTIONS[args.reward]}


# ----------------------------------------------------------------------------- diagnostics

def rationale_metrics(tok, ro):
    """Mean rationale length (tokens before the stop token) and the shares of empty rationales (a
    policy that learns to write nothing is the first hack to rule out) and of truncated ones, counted
    as evaluate.py counts them (policy.rationale_stats). -> (metrics, the decoded rationales)"""
    texts, tokens, empty = policy.rationale_stats(tok, ro)
    return dict(rationale_len=tokens.float().mean().item(), empty_frac=empty.float().mean().item(),
                truncated_frac=ro.truncated.float().mean().item()), texts


def cos_between_texts(emb, group_size=1):
    """Mean cosine between embeddings of different texts (rows of different groups): collapse -> 1."""
    group = torch.arange(emb.shape[0], device=emb.device) // group_size
    different = group[:, None] != group[None, :]
    return (emb @ emb.T)[different].mean().item() if different.any() else float("nan")


def diagnostics(main, parts, G, ro):
    """Collapse (cosine between different texts), diversity (within a group), and per reward term the
    share of its variance that is within groups: the only part a group baseline passes to the advantage."""
    n = main.shape[0] // G
    group = torch.arange(main.shape[0], device=main.device) // G
    same_not_self = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool, device=main.device)
    out = {"cos_between_texts": cos_between_texts(main, G),
           "cos_within_group": (main @ main.T)[same_not_self].mean().item() if G > 1 else float("nan")}
    for k, v in parts.items():
        if k != "truncated":
            total = v.var(unbiased=False).item()
            within = v.reshape(n, G).var(-1, unbiased=False).mean().item()
            out[f"within_share/{k}"] = within / total if total > 1e-12 else 0.0
    distinct = [len(set(s[m.bool()].tolist())) / max(1, int(m.sum())) for s, m in zip(ro.sequences, ro.completion_mask)]
    out["distinct_token_ratio"] = sum(distinct) / len(distinct)
    return out


@torch.no_grad()
def sts_spearman(model, tok, pairs, args):
    """Spearman of cos(h1, h2) against the gold scores, greedy rationales through policy.encode: a quick
    in-training check (evaluate.py is the real evaluation)."""
    texts = [p[0] for p in pairs] + [p[1] for p in pairs]
    e = torch.cat([encode(model, tok, texts[s:s + 32], args, temperature=0.0, stale=s == 0).embeddings
                   for s in range(0, len(texts), 32)]).double().cpu()
    return spearman((e[:len(pairs)] * e[len(pairs):]).sum(-1), torch.tensor([p[2] for p in pairs]))


def spearman(x, y):
    """rho = Pearson correlation of the (average) ranks of x and y; NaN when either is constant."""
    a, b = _ranks(x.double()), _ranks(y.double())
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    _, inv = torch.unique(x, return_inverse=True)
    return (torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, ranks) / torch.bincount(inv))[inv]


# ----------------------------------------------------------------------------- the loop

def run(args, given=frozenset()):
    rank, world = setup_distributed(args)
    out = Path(args.out)
    records, model, tok, ref, opt, state, sts = prepare(args, given, world, rank)  # reads only: bad input stops here
    with checkpoint.lock(out) if rank == 0 else contextlib.nullcontext():  # one run per folder
        if rank == 0:
            for note in checkpoint.settle(out, state["step"] if args.resume else None):
                print(f"note: {note}", flush=True)
            checkpoint.write_config(out, settings(args))
        generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # each rank its own samples
        if state.get("rng") and len(state["rng"]) == world:  # (with another number of processes: fresh seeds)
            checkpoint.set_rng_state(state.pop("rng")[rank], generator)
        step_fn = contrastive_step if args.objective == "contrastive" else rl_step
        stop = catch_signals()
        bar = tqdm(total=args.steps, initial=state["step"], disable=rank != 0, dynamic_ncols=True)
        try:
            while state["step"] < args.steps:
                batch = next_batch(records, state, args, rank, world)
                try:
                    metrics, (record, rationale) = step_fn(model, ref, tok, opt, batch, args, generator, world)
                except FloatingPointError as e:
                    raise TrainingError(f"step {state['step'] + 1}: {e} (try a lower --lr); "
                                        f"the checkpoints already saved in {out} are kept") from None
                state["step"] += 1
                metrics["peak_mem_mb"] = peak_memory_mb()
                if sts is not None and state["step"] % args.eval_every == 0:
                    metrics["sts_dev_spearman"] = sts_spearman(model, tok, sts, args)
                metrics = average_over_ranks(dict(metrics, stop=float(bool(stop))), world)
                state["prompts_cut"] += round(metrics.pop("prompts_cut") * world)
                stopping = metrics.pop("stop") > 0 and state["step"] < args.steps  # a finished run just ends
                if rank == 0:
                    log_step(out, bar, state, metrics, record, rationale, args)
                count_nonfinite(state, metrics)  # after logging: the metrics show the skipped steps
                if stopping or state["step"] % args.save_every == 0 or state["step"] == args.steps:
                    save(out, model, tok, opt, state, args, generator, rank, world)
                if stopping:
                    if rank == 0:
                        tqdm.write(f"interrupted: saved {out}/step-{state['step']}; --resume continues from it")
                    raise KeyboardInterrupt
        finally:
            bar.close()
            stop.restore()
        weights = fsdp.model_state(model) if args.fsdp else None  # --fsdp: gathered to rank 0 by every rank
        if rank == 0:
            final = checkpoint.export_final(out, model, tok, files=grace_files(args, state["step"]), state_dict=weights)
            print(f"done: {out}/step-{state['step']} (resumable) and {final} (the model)  metrics: {out}/metrics.jsonl")
            if state["prompts_cut"]:
                print(f"note: {state['prompts_cut']} prompts were cut to --max-prompt-tokens {args.max_prompt_tokens}")


def peak_memory_mb():
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def next_batch(records, state, args, rank, world):
    """This rank's records of the next rollout batch; a fresh seeded shuffle each epoch."""
    while True:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        if state["position"] + args.batch_size <= len(order):
            break
        state["epoch"], state["position"] = state["epoch"] + 1, 0
    local = args.batch_size // world  # shard by group: each rank rolls out and rewards its own texts
    idx = order[state["position"]:state["position"] + args.batch_size][rank * local:(rank + 1) * local]
    state["position"] += args.batch_size
    return [records[i] for i in idx]


class TrainingError(Exception):
    """Training went wrong in a way the user must act on (divergence): one line, exit status 1."""


def count_nonfinite(state, metrics):
    """Skipped (non-finite) steps in a row; MAX_NONFINITE_IN_ROW of them stop the run."""
    state["skipped"] = state.get("skipped", 0) + int(metrics.get("skipped", 0) > 0)
    state["skipped_in_row"] = state.get("skipped_in_row", 0) + 1 if metrics.get("skipped", 0) > 0 else 0
    if state["skipped_in_row"] >= MAX_NONFINITE_IN_ROW:
        raise TrainingError(f"{MAX_NONFINITE_IN_ROW} steps in a row had a non-finite loss or gradient (NaN/inf), "
                            f"up to step {state['step']}: stopping without saving them (try a lower --lr, a larger "
                            f"--tau or a smaller --kl-coef)")


def log_step(out, bar, state, metrics, record, rationale, args):
    row = dict(step=state["step"], epoch=state["epoch"], **metrics)
    checkpoint.append_metrics(out, row)
    shown = ("reward", "kl", "loss", "accuracy", "cos_between_texts", "rationale_len", "tokens_per_s")
    bar.set_postfix({k.replace("cos_between_texts", "collapse"): f"{metrics[k]:.3g}" for k in shown if k in metrics})
    bar.update(1)
    if args.log_rationales and state["step"] % args.log_rationales == 0:
        text = record.get("positive", record.get("text"))
        tqdm.write(f"[step {state['step']}] text: {text[:200]}\n  rationale: {rationale[:400]!r}")


def average_over_ranks(metrics, world):
    """Every metric averaged over ranks (so a Ctrl-C on any rank stops them all)."""
    if world == 1:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(metrics, (values / world).tolist()))


def catch_signals():
    """Ctrl-C (or SIGTERM: torchrun's stop, a cluster's preemption) finishes the current step, saves it
    and exits: a checkpoint taken mid-update would hold weights between two steps and could never be
    resumed exactly. A second signal aborts at once. -> a list, non-empty once a signal came."""
    stop = SignalFlag()
    stop.previous = {sig: signal.signal(sig, stop.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return stop


class SignalFlag(list):
    def on_signal(self, *_):
        if self:
            raise KeyboardInterrupt
        self.append(1)
        tqdm.write("stopping: finishing this step, then saving (Ctrl-C again aborts without saving)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- plumbing: setup and resume

# Settings a resumed run may change: each change is applied and announced. Any other flag given with
# --resume must match the saved run (or --force-resume applies it too: the run is then another run).
RESUME_MAY_CHANGE = {"steps", "epochs", "lr", "weight_decay", "max_grad_norm", "save_every", "keep_last",
                     "eval_every", "eval_pairs", "eval_data", "log_rationales", "device", "threads", "compile"}
NOT_SETTINGS = {"resume", "force_resume", "out"}
MACHINE = {"device", "threads", "compile"}  # where it runs, not what it computes: never taken from the saved run


def prepare(args, given, world, rank):
    """Everything that can fail on bad input, before anything is written: settings, data, models,
    optimizer and the resumed state. -> (records, model, tokenizer, reference or None, optimizer, state, sts)."""
    out = Path(args.out)
    state, resume_from = dict(step=0, epoch=0, position=0, prompts_cut=0), None
    if args.resume:
        try:
            resume_from, skipped = checkpoint.resume_point(out, args.resume)
        except checkpoint.CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
        for bad, why in skipped if rank == 0 else ():
            print(f"note: skipping {bad}: {why}", flush=True)
        saved = checkpoint.read_state(resume_from)
        merge_resumed_settings(args, saved["args"], given, rank)
        state.update({k: saved[k] for k in state}, rng=saved["rng"])
    elif checkpoint.checkpoints(out):
        raise UsageError(f"{out}/ already holds a run; pass --resume to continue it, or --out NEW_DIR")
    records = load_or_usage_error(data.load_records, args.data, args.mode)
    if args.batch_size > len(records) or args.batch_size % world or args.batch_size // world % args.mini_batch_size:
        raise UsageError(f"--batch-size {args.batch_size} must be at most the {len(records)} records and split into "
                         f"{world} process(es) x whole mini-batches of --mini-batch-size {args.mini_batch_size}")
    args.steps = args.steps or max(1, args.epochs * len(records) // args.batch_size)
    if args.eval_every and not args.eval_data:
        raise UsageError("--eval-every needs --eval-data FILE (JSONL with sentence1, sentence2, score, e.g. the "
                         "STS Benchmark dev split)")
    sts = load_or_usage_error(data.load_sts_pairs, args.eval_data, args.eval_pairs) if args.eval_every else None
    model, tok, ref = load_models(args, resume_from)
    torch.manual_seed(args.seed), random.seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if resume_from is not None:
        if args.fsdp:  # saved as a full state dict keyed by parameter name; each rank takes its slices
            fsdp.load_optimizer_state(model, opt, saved["optimizer"])
        else:
            opt.load_state_dict(saved["optimizer"])
        for group in opt.param_groups:  # the saved param_groups carry the old values: the command line wins
            group.update(lr=args.lr, weight_decay=args.weight_decay)
    if rank == 0:
        print(f"grace: {args.objective} ({args.mode}) on {len(records)} records, model {args.model}, preset "
              f"{args.preset}, {args.steps} steps of {args.batch_size} texts x G={args.group_size}, "
              f"{world} process(es) on {args.device}" + (f", from {resume_from}" if resume_from else ""), flush=True)
    return records, model, tok, ref, opt, state, sts


def merge_resumed_settings(args, saved, given, rank):
    """The saved run's settings win; flags given now may change only RESUME_MAY_CHANGE (applied and
    announced). Another model, data, mode or hyper-parameter is refused unless --force-resume."""
    may_change = set(vars(args)) if args.force_resume else RESUME_MAY_CHANGE
    merged, changed, refused = checkpoint.merge_settings(saved, vars(args), given, may_change,
                                                         keep_current=NOT_SETTINGS | MACHINE)
    if refused:
        raise UsageError(f"--resume continues the saved run, which differs in: {', '.join(refused)}; "
                         f"drop these flags, or pass --force-resume to apply them anyway")
    vars(args).update(merged)
    if changed and rank == 0:
        print("note: resuming with changed settings: " + ", ".join(changed), flush=True)


def load_or_usage_error(fn, *a):
    try:
        return fn(*a)
    except data.DataError as e:
        raise UsageError(str(e)) from None


def load_models(args, resume_from):
    """The policy (from the checkpoint when resuming), and the frozen reference (the base model, bf16 on
    GPU since it never steps) unless --kl-coef 0 or --objective contrastive."""
    try:
        model, tok = policy.load(resume_from or args.model, device=args.device, seed=args.seed)
        ref = None
        if args.kl_coef and args.objective == "grpo":
            ref = policy.load(args.model, device=args.device, dtype=policy.low_precision(args.device), seed=args.seed)[0]
            ref.eval().requires_grad_(False)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    try:  # the prompt template alone must fit --max-prompt-tokens
        policy.build_prompts(tok, ["x"], max_length=args.max_prompt_tokens)
    except ValueError as e:
        raise UsageError(f"--max-prompt-tokens {args.max_prompt_tokens}: {e}") from e
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.max_prompt_tokens + args.max_new_tokens > limit:
        raise UsageError(f"--max-prompt-tokens {args.max_prompt_tokens} + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's {limit} positions")
    disable_dropout(model)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.eval()
    if args.fsdp:  # the reference stays whole (bf16 on GPU): no_grad only, 2 B/param, no collectives in scoring
        fsdp.shard(model, args.device, offload=args.offload)
    return model, tok, ref


def disable_dropout(model):
    """RL scores the same tokens several times (sampling, old, new): dropout would make them disagree."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE: one process per GPU (nccl) or per CPU worker (gloo)."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.offload and not args.fsdp:
        raise UsageError("--offload needs --fsdp")
    if "RANK" not in os.environ:
        if args.fsdp:
            raise UsageError("--fsdp needs torchrun (torchrun --nproc_per_node=N train.py ...; N = 1 works too)")
        return 0, 1
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------- plumbing: checkpoints

def save(out, model, tok, opt, state, args, generator, rank, world):
    """OUT/step-N/ (rank 0 writes; every rank's RNG state goes in, so each resumes its own stream)."""
    rngs = [checkpoint.rng_state(generator)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, checkpoint.rng_state(generator))
    weights, optimizer_state = None, None
    if args.fsdp:  # gather full (CPU) state dicts to rank 0: collectives, every rank takes part
        weights, optimizer_state = fsdp.model_state(model), fsdp.optimizer_state(model, opt)
    if rank == 0:
        finite = all(bool(torch.isfinite(v).all()) for v in weights.values()) if args.fsdp else \
            checkpoint.is_finite_state(model)
        if not finite:
            raise TrainingError(f"the weights are not finite at step {state['step']}: not saved (try a lower --lr)")
        trainer_state = dict({k: state[k] for k in ("step", "epoch", "position", "prompts_cut")},
                             rng=rngs, args=settings(args))
        try:
            checkpoint.save(out, state["step"], model, tok, trainer_state,
                            optimizer_state=optimizer_state if args.fsdp else opt.state_dict(), state_dict=weights,
                            keep_last=args.keep_last, files=grace_files(args, state["step"]))
        except checkpoint.CheckpointError as e:
            raise TrainingError(str(e)) from None
    if world > 1:
        dist.barrier()


def settings(args):
    """The run's resolved settings (JSON-safe): config.json and every checkpoint carry them."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def grace_files(args, step):
    """Files saved beside the weights: grace.json (how evaluate.py embeds as the policy was trained),
    a model card, and the files that make sentence-transformers refuse it instead of mis-embedding it."""
    info = dict(base_model=args.model, preset=args.preset, step=step, objective=args.objective,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                max_prompt_tokens=args.max_prompt_tokens, system_prompt=policy.DEFAULT_SYSTEM_PROMPT)
    return {"grace.json": json.dumps(info, indent=1) + "\n", "README.md": checkpoint.model_card(info),
            **checkpoint.st_guard_files()}


# ----------------------------------------------------------------------------- plumbing: the CLI

SAMPLE_DATA = policy.SAMPLE_DATA


class HelpFormatter(argparse.HelpFormatter):
    """Appends the real default to each help line (preset-dependent flags say so in their help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(suppress=False):
    """The CLI. suppress=True gives the same parser with no defaults: it tells which flags were given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress else None)

    def group(title):
        g = p.add_argument_group(title)

        def a(*names, default=None, **kw):
            if kw.get("action") == "store_true":
                default = False
            g.add_argument(*names, **({} if suppress else {"default": default}), **kw)
        return a

    def per_preset(key):
        return "; by preset: " + ", ".join(f"{name} {values.get(key, '-')}" for name, values in PRESETS.items())

    a = group("model and data")
    a("--model", default="tiny", help="causal LM folder or hub name, or a built-in: tiny (random), tiny-lm (pretrained here)")
    a("--data", default=str(SAMPLE_DATA), help="JSONL / CSV / Parquet / .txt file, or a datasets hub name (see data.py)")
    a("--mode", default="supervised", choices=["supervised", "unsupervised"],
      help="(query, positive, negative) records, or one text per record")
    a("--objective", default="grpo", choices=["grpo", "contrastive"],
      help="GRACE's policy gradient, or the InfoNCE baseline on the same embeddings (supervised only)")
    a("--preset", choices=list(PRESETS), help="defaults for the flags marked 'by preset' (default: tiny / tiny-lm "
      "for those models and their checkpoints, else release)")
    a("--max-prompt-tokens", type=int, default=1024, help="prompt length limit; longer texts are cut")
    a("--steps", type=int, help="rollout batches to train on (default: --epochs' worth)" + per_preset("steps"))
    a("--epochs", type=int, help="passes over the data when --steps is not given" + per_preset("epochs"))
    a = group("rollouts")
    a("--group-size", type=int, help="G rationales per text" + per_preset("group_size"))
    a("--max-new-tokens", type=int, help="rationale length limit" + per_preset("max_new_tokens"))
    a("--temperature", type=float, default=1.0, help="sampling temperature of the main rollouts")
    a("--side-temperature", type=float, default=0.5, help="temperature of the query and negative rationales")
    a("--top-p", type=float, default=1.0, help="nucleus of the main rollouts (log-probs are scored unfiltered)")
    a("--top-k", type=int, default=0, help="top-k of the main rollouts, 0 = off (log-probs are scored unfiltered)")
    a("--rollout-rows", type=int, default=0, help="rationales sampled at once per rank, 0 = all; bounds the KV "
      "cache (rows x (prompt + new tokens) per layer), which at the release's batch outgrows a 3-4B model; "
      "compiled, a shorter last chunk compiles once more: pick a divisor of the rows per rank")
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="static-cache + torch.compile sampler with bucketed prompt widths; auto = on for CUDA, off on CPU")
    a = group("reward")
    a("--reward", default="release", choices=list(reward.REWARDS), help="GRACE's released reward or per-rollout InfoNCE")
    a("--tau", type=float, default=0.1, help="similarity temperature of the reward (and of --objective contrastive)")
    a("--no-scale", action="store_true", help="release reward: do not divide its terms by tau")
    a("--clustering-weight", type=float, help="release reward: weight of s_clu (default: 0.2)")
    a("--cross-group-weight", type=float, help="release reward: weight of s_x (default: 0.2)")
    a("--no-length-penalty", action="store_true", help="no -1 reward for rationales cut at --max-new-tokens")
    a("--scale-adv-by-std", action="store_true", help="divide advantages by the group std (GRPO; the release does not)")
    a = group("optimisation")
    a("--batch-size", type=int, help="texts per rollout batch, all ranks together" + per_preset("batch_size"))
    a("--mini-batch-size", type=int, help="texts per optimizer step, per rank" + per_preset("mini_batch_size"))
    a("--micro-batch-size", type=int, help="texts per forward/backward: gradient accumulation (default: mini batch)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--lr", type=float, help="AdamW learning rate, constant" + per_preset("lr"))
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    a("--clip-eps", type=float, default=0.2, help="PPO ratio clip: rho in [1 - eps, 1 + eps]")
    a("--dual-clip", type=float, default=3.0, help="cap on the loss of negative-advantage tokens: -c A (verl's clip_ratio_c)")
    a("--kl-coef", type=float, default=0.001, help="KL penalty weight beta; 0 = the release (no reference model)")
    a("--kl-type", default="k3", choices=["k1", "k2", "k3"],
      help="KL estimator in the loss. Its gradient: k1 has E[grad] = 0 (regularises nothing in the loss; k1 belongs "
           "in the reward, where it gives the unbiased reverse-KL gradient); k2 gives the reverse-KL gradient; "
           "k3 (the release's 'low_var_kl') the forward-KL gradient")
    a("--aggregation", default="token", choices=["token", "sequence", "constant"],
      help="loss mean over all tokens | per sequence then rows | Dr.GRPO's sum / (rows x max_new_tokens)")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (long rationales)")
    a("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state over the "
      "processes (FSDP2, one unit per decoder layer; see fsdp.py)")
    a("--offload", action="store_true", help="with --fsdp: keep the shards and AdamW on the CPU (CPUOffloadPolicy)")
    a("--seed", type=int, default=0, help="seeds data order, sampling and the tiny model")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    a("--threads", type=int, default=1, help="CPU threads for torch (1 is fastest for tiny models on a busy "
      "machine; see README)")
    a = group("checkpoints")
    a("--out", default="out", help="run folder: step-N/ checkpoints, final/, metrics.jsonl, config.json")
    a("--save-every", type=int, default=10, help="steps between checkpoints")
    a("--keep-last", type=int, default=3, help="checkpoints kept (each holds optimizer state, 2x the weights)")
    a("--resume", nargs="?", const="latest", help="continue the run in --out from its newest complete "
      "checkpoint (or from the step-N folder given); its saved settings are used")
    a("--force-resume", action="store_true", help="with --resume: apply flags that change the run (model, data, ...)")
    a = group("evaluation and logging")
    a("--eval-every", type=int, default=0, help="STS Spearman on --eval-pairs pairs every N steps (0: never)")
    a("--eval-pairs", type=int, default=200, help="pairs of --eval-data used by --eval-every")
    a("--eval-data", help="STS JSONL (sentence1, sentence2, score) for --eval-every")
    a("--log-rationales", type=int, default=10, help="print a text and its rationale every N steps (0: never)")
    return p


# flag: (lowest allowed, highest allowed); every float flag must also be finite
RANGES = dict(batch_size=(1, 1 << 20), group_size=(1, 1024), mini_batch_size=(1, 1 << 20),
              micro_batch_size=(1, 1 << 20), rollout_rows=(0, 1 << 20), ppo_epochs=(1, 1000), steps=(1, 1 << 40),
              epochs=(1, 1 << 20),
              max_prompt_tokens=(1, 1 << 20), max_new_tokens=(1, 1 << 20), save_every=(1, 1 << 40),
              keep_last=(1, 1 << 20), eval_pairs=(2, 1 << 30), eval_every=(0, 1 << 40), log_rationales=(0, 1 << 40),
              seed=(0, 2**32 - 1), threads=(1, 1024), top_k=(0, 1 << 30), lr=(0, 1), weight_decay=(0, 1),
              kl_coef=(0, 1e6), clustering_weight=(-1e6, 1e6), cross_group_weight=(-1e6, 1e6),
              dual_clip=(1, 1e6), temperature=(1e-4, 100), side_temperature=(0, 100), top_p=(1e-6, 1),
              tau=(1e-4, 1e6), clip_eps=(1e-6, 1e6), max_grad_norm=(1e-12, 1e12))


def parse_args(argv=None):
    """-> (args, the set of flags given on the command line)."""
    p = build_parser()
    args = p.parse_args(argv)
    given = set(vars(build_parser(suppress=True).parse_args(argv)))
    args.preset = args.preset or default_preset(args.model)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.micro_batch_size = args.micro_batch_size or args.mini_batch_size
    for k, (low, high) in RANGES.items():
        v = getattr(args, k)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            p.error(f"--{k.replace('_', '-')} must be a finite number, got {v}")
        if not low <= v <= high:
            p.error(f"--{k.replace('_', '-')} must be in [{low}, {high}], got {v}")
    try:
        policy.check_device(args.device)
    except ValueError as e:
        p.error(f"--device {e}")
    if args.reward != "release":
        wrong = [f"--{k.replace('_', '-')}" for k in ("no_scale", "clustering_weight", "cross_group_weight") if k in given]
        if wrong:
            p.error(f"{', '.join(wrong)} only apply to --reward release, not --reward {args.reward}")
    if args.objective == "contrastive" and args.mode != "supervised":
        p.error("--objective contrastive needs --mode supervised (query, positive, negative records)")
    args.clustering_weight = 0.2 if args.clustering_weight is None else args.clustering_weight
    args.cross_group_weight = 0.2 if args.cross_group_weight is None else args.cross_group_weight
    if args.compile == "auto":
        args.compile = "on" if args.device.startswith("cuda") else "off"
    return args, given


def default_preset(model):
    """tiny and tiny-lm (and checkpoints trained from them) get their own presets; anything else the release's."""
    info = Path(model) / "grace.json"
    if info.exists():
        try:
            return json.loads(info.read_text()).get("preset", "release")
        except (OSError, json.JSONDecodeError):
            return "release"
    return model if model in PRESETS else "release"


def main(argv=None):
    args, given = parse_args(argv)
    try:
        run(args, given)
    except (UsageError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
