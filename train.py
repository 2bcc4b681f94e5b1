"""Train a GRACE policy: rationales -> embeddings -> contrastive rewards -> group-relative PG.

    python train.py                                        # the tiny demo on CPU: 20 steps
    python train.py --model tiny-lm --data triplets.jsonl  # the small LM shipped: watch it learn
    python train.py --model Qwen/Qwen2.5-1.5B-Instruct --data triples.jsonl
    torchrun --nproc_per_node=4 train.py --model ... --data ...  # data-parallel, groups per rank
    torchrun --nproc_per_node=8 train.py --fsdp [--offload] ...  # FSDP2: all state sharded

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

Deviations from the authors' release (GasolSun36/GRACE, built on verl), each on purpose:
 1. The KL penalty is on by default (beta 0.001, k3, in the loss); the release's kl_loss_coef is 0.
    Why: a tie to the base model, to keep its generative abilities; --kl-coef 0 is the release and
    loads no reference model.
 2. One optimizer step per rollout batch (one mini-batch, --ppo-epochs 1): pi_old is the current
    policy, its log-probs the new ones detached (rho = 1 exactly, as TRL does) and their forward
    skipped; verl recomputes them in a separate pass (rho = 1 up to rounding). Otherwise they are
    the sampler's own (rollout.sample). Why: a forward less for the same math.
 3. verl skips an optimizer step whose gradient norm is not finite; here one whose loss is not
    finite too, counted in `skipped`, and three in a row stop the run; nothing non-finite is ever
    saved. Why: a diverged run should stop, not go on training.
 4. The token-mean divides by the valid tokens of a rank's whole mini-batch, so accumulated
    micro-batches give exactly its gradient; verl (dynamic batching) takes a token-mean per
    micro-batch, weighted by the micro-batch's share of the mini-batch's rows. Both average the
    gradients of the ranks, so under torchrun the mean is per rank in both.
 5. --objective contrastive is not GRACE: InfoNCE on the same pooled embeddings (greedy rationales,
    in-batch negatives) with gradients through the encoder. The paper does run a contrastive
    baseline ("w/ CL training (InfoNCE)", Table 1 and Table 5); the release's train.sh runs GRPO
    only, so this one is ours: comparable here (same data, checkpoints and metrics), not the
    paper's setup.
 6. The in-training STS check (--eval-every) writes greedy rationales: a deterministic number to
    compare steps by. The release runs no such check; its evaluation samples one at 1.0.
 7. An over-long text is cut inside the text; the template and generation prompt stay whole
    (policy.build_prompts). The release's evaluation cuts the whole chat prompt's tokens at 1024,
    template included; its training keeps its raw prompt's first 1023 tokens + <|endoftext|>.
    Why: a cut template loses the turn's end, the model's cue to answer.
 8. Two records of a rollout batch with the same positive are two reward groups of G here; the
    release's reward manager merges rollouts of identical prompts into one group of 2G (clustering,
    cross-group), while its advantages group by uid, per record as here. Why: one kind of group.
 9. --aggregation constant divides by rows x max_new_tokens (Dr.GRPO's fixed constant, on the
    token-mean's scale); verl's Dr.GRPO mode (seq-mean-token-sum-norm) divides by the width L.
10. A rationale is finished (no length penalty) when it stops at any of the generation_config's EOS
    ids, where rollout.py stops (policy.stop_token_ids); the release's penalty checks
    tokenizer.eos_token_id only. Why: one meaning of "finished" for sampling, masks and reward.
11. Under torchrun a rank's rewards see its own groups only: the cross-group terms compare a group
    with the batch / N groups of its rank; the release scores the whole rollout batch at once.
    Why: no gather of embeddings across ranks (one process: identical).
12. Presets tiny and tiny-lm use policy.DEFAULT_SYSTEM_PROMPT (the built-in models'); the release
    preset uses the release's (cli.RELEASE_SYSTEM_PROMPT). --system-prompt[-file] sets any.
13. Training prompts are chat prompts, as evaluation's (policy.render_prompt). The release's
    training data (rl_dataset.py, as published) is raw text: PROMPT2, a line break, the text, a
    line break, <|endoftext|>, with no chat template; only its evaluation (eval_mteb.py) has one.
    Why: method.md's one prompt, the same in training and evaluation.

Batch sizes are global, as released: --batch-size and --mini-batch-size count the texts of all N
ranks together (batch / N and mini / N per rank: batch / mini optimizer steps per rollout batch,
whatever N); --micro-batch-size is per rank. Each rank samples its groups with its own seed.
Checkpoints of multi-process runs from before this counted --mini-batch-size per rank: resumed,
the same number now gives N times more optimizer steps per rollout batch (to keep the old steps,
pass --mini-batch-size M x N --force-resume).

Precision: float32 master weights, gradients and AdamW state; on CUDA every forward (rollouts,
embeddings, log-probs) runs under bf16 autocast (policy.autocast), and the frozen reference is kept
in bf16 (it never steps). Compiled rollouts run on a decode copy with bf16 Linear weights, refreshed
from the master: the numbers autocast computes, without re-casting every weight at every token
(infra/fast_decode.py). Under --fsdp every rollout runs on fsdp.plain_copy, a plain copy of the
sharded weights. CPU runs are float32 throughout.

Reading order: the math (pure functions), one step (a staged pipeline), the loop, the setup. The
flags are in infra/cli.py, the run folder (checkpoints, resume, metrics) in infra/runfolder.py.
"""
import os
import signal

if __name__ == "__main__":  # Ctrl-C while importing and loading exits at once, quietly (an
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # exception there: a traceback)

import contextlib  # noqa: E402  (every import below comes after that line on purpose)
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lora  # noqa: E402
import policy  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402
from infra import cli, console, data, diagnostics, dist, fast_decode, fsdp, runfolder  # noqa: E402
from infra.cli import TrainingError, UsageError  # noqa: E402

MAX_NONFINITE_IN_ROW = 3


# ----------------------------------------------------------------------------- the math

def group_advantages(rewards, group_size, scale_by_std=False, eps=1e-6):
    """A_i = r_i - mean_{j in group(i)} r_j  [ / (std_group + eps) ], rewards (N,) -> (N,) float32.

    std is the population std (unbiased=False): torch.std's default would be sqrt(G/(G-1)) larger
    (x1.07 at G = 8, x1.41 at G = 2) and undefined at G = 1. Equal rewards give 0, not NaN.
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
    c = d.clamp(-20, 20)  # verl's low_var_kl guard: d in [-20, 20], then k3 in [-10, 10]
    return {"k1": lambda: -d, "k2": lambda: 0.5 * d ** 2,
            "k3": lambda: (torch.exp(c) - c - 1).clamp(-10, 10)}[kl_type]()


def loss_normaliser(mask, how, max_new_tokens=None):
    """The denominator of `aggregate` for a batch: valid tokens | rows | rows x max_new_tokens.

    Computed once for a whole mini-batch and passed to every micro-batch's loss, so gradient
    accumulation sums to exactly the mini-batch's aggregate, whatever the micro-batch split."""
    if how == "token":
        return mask.sum().clamp(min=1).item()
    if how == "sequence":
        return mask.shape[0]
    if how == "constant":  # Dr.GRPO: a fixed number, not the padded width (it moves as rows stop)
        return mask.shape[0] * max_new_tokens
    raise ValueError(f"aggregation must be token, sequence or constant, got {how!r}")


def aggregate(x, mask, how, normaliser):
    """Reduce per-token x (B, T) over mask: token: sum / tokens | sequence: sum of row means /
    rows | constant: sum / (rows x max_new_tokens), each denominator given by `loss_normaliser`."""
    x = x * mask
    if how == "sequence":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return x.sum() / normaliser


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.001,
                kl_type="k3", aggregation="token", max_new_tokens=None, dual_clip=3.0,
                normaliser=None):
    """Clipped policy-gradient loss + KL penalty; logp/old_logp/ref_logp/mask (B, T), adv. (B,).

    loss_t = -min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + kl_coef * k(logp_t, ref_t)
    rho_t = exp(logp_t - old_t)
    dual_clip c (verl's clip_ratio_c): for A < 0 the loss is also capped at -c A, so one token whose
    ratio exploded cannot dominate. ref_logp None (or kl_coef 0) means no KL term. normaliser: see
    loss_normaliser (default: this batch's own).
    """
    mask = mask.float()
    A = advantages.float()[:, None]  # (B, 1)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # (B, T); verl's guard on the log-ratio
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
    positive and every negative of the batch. query/positive/negative (B, H) L2-normalised."""
    candidates = torch.cat([positive, negative]).float()  # (2B, H)
    logits = query.float() @ candidates.T / tau  # (B, 2B)
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


# ----------------------------------------------------------------------------- one step

def rl_step(model, ref, tok, opt, batch, args, generator, world):
    """One GRPO step on a batch of records -> (metrics, (record, its first rationale))."""
    G, supervised = args.group_size, args.mode == "supervised"
    # one optimizer step per rollout batch: pi_old = pi_theta (its log-probs: the new ones detached)
    on_policy = args.ppo_epochs == 1 and len(batch) == args.mini_batch_size // world
    t0 = time.perf_counter()

    # 1. rollouts and embeddings, no gradient, both from the sampler (policy.encode): G main
    #    rationales per positive (each prompt prefilled once; pi_old's log-probs from the logits
    #    they were drawn from, unless on-policy), one low-temperature rationale per query/negative
    texts = [r["positive" if supervised else "text"] for r in batch]
    main = encode(model, tok, texts, args, n=G, temperature=args.temperature, generator=generator,
                  logprob_temperature=None if on_policy else args.temperature)
    sides = [r["query"] for r in batch] + [r["negative"] for r in batch] if supervised else texts
    side = encode(model, tok, sides, args, n=1, temperature=args.side_temperature,
                  generator=generator, stale=False)
    q = side.embeddings[:len(batch)].repeat_interleave(G, 0)  # (N, H): each group's query, G rows
    neg = side.embeddings[len(batch):].repeat_interleave(G, 0) if supervised else None
    t1 = time.perf_counter()

    # 2. rewards (N,) -> advantages (N,)
    rewards, parts = reward.REWARDS[args.reward](q, main.embeddings, neg, G, temperature=args.tau,
                                                 truncated=main.rollout.truncated,
                                                 length_penalty=not args.no_length_penalty,
                                                 **cli.reward_options(args))
    adv = group_advantages(rewards, G, args.scale_adv_by_std)

    # 3. reference log-probs (N, L) of the main rationales, for the KL penalty
    rollouts, rows = main.rollout, args.micro_batch_size * G
    ref_logp = None
    if ref is not None:  # (under LoRA the policy itself, its adapters off: the base model)
        chunks = [slice(s, s + rows) for s in range(0, len(rollouts.sequences), rows)]  # bounded
        with torch.no_grad(), lora.disabled(ref):
            ref_logp = torch.cat([policy.token_logprobs(ref, rollouts.sequences[c],
                                                        rollouts.attention_mask[c],
                                                        rollouts.completion_mask[c],
                                                        temperature=args.temperature)
                                  for c in chunks])
    t2 = time.perf_counter()

    # 4. --ppo-epochs passes of mini-batches of the clipped loss
    model.train(args.grad_checkpointing)  # HF checkpoints only in train mode; dropout is 0 anyway
    stats = update(model, opt, rollouts, adv, main.logprobs, ref_logp, args, world)
    model.eval()  # rollouts use the KV cache, which gradient checkpointing (train mode) turns off
    t3 = time.perf_counter()

    cut = None if args.no_length_penalty else main.rollout.truncated  # rewards replaced by -1
    metrics, rationales = diagnostics.rl_metrics(tok, main, side, rewards, parts, adv, stats,
                                                 (t0, t1, t2, t3), G, cut)
    return metrics, (batch[0], rationales[0])


def update(model, opt, rollouts, adv, old_logp, ref_logp, args, world):
    """--ppo-epochs passes, one optimizer step per mini-batch (after the first the data is
    off-policy: the clip acts), each accumulated over micro-batches. old_logp None: on-policy.
    A step whose loss or gradient is not finite is skipped. -> mean loss statistics."""
    seqs, attention = rollouts.sequences, rollouts.attention_mask
    completion = rollouts.completion_mask  # (N, L) the tokens that are scored
    G = args.group_size  # a rank's mini-batch: its share of the global one
    rows, micro = args.mini_batch_size // world * G, args.micro_batch_size * G
    stats, skipped, grad_norm = [], 0, float("nan")
    for _ in range(args.ppo_epochs):
        for start in range(0, len(seqs), rows):
            mini = slice(start, min(start + rows, len(seqs)))
            normaliser = loss_normaliser(completion[mini].float(), args.aggregation,
                                         args.max_new_tokens)
            opt.zero_grad(set_to_none=True)
            finite = True
            for s in range(mini.start, mini.stop, micro):
                r = slice(s, min(s + micro, mini.stop))  # this micro-batch's rows
                logp = policy.token_logprobs(model, seqs[r], attention[r], completion[r],
                                             temperature=args.temperature)  # (rows, T), with grad
                old = logp.detach() if old_logp is None else old_logp[r]
                loss, loss_stats = policy_loss(
                    logp, old, None if ref_logp is None else ref_logp[r], adv[r], completion[r],
                    clip_eps=args.clip_eps, kl_coef=args.kl_coef, kl_type=args.kl_type,
                    aggregation=args.aggregation, max_new_tokens=args.max_new_tokens,
                    dual_clip=args.dual_clip, normaliser=normaliser)
                finite &= bool(torch.isfinite(loss))
                loss.backward()
                stats.append(dict(loss_stats, loss=loss.item()))
            grad_norm = step_optimizer(model, opt, args, world, finite)
            skipped += not math.isfinite(grad_norm)
    out = {k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}
    return dict(out, grad_norm=grad_norm, skipped=skipped)


def step_optimizer(model, opt, args, world, finite=True):
    """Average gradients over ranks, clip, step -> the gradient norm (NaN, no step: not finite)."""
    if world > 1 and not args.fsdp:  # (under --fsdp the reduce-scatter of backward averaged them)
        dist.all_reduce_gradients(model, world)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    grad_norm = fsdp.full_tensor(norm).item()
    if not (finite and math.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)  # skip: a NaN step would poison weights and AdamW moments
        return float("nan")
    opt.step()
    return grad_norm


def contrastive_step(model, ref, tok, opt, batch, args, generator, world):
    """--objective contrastive: InfoNCE on the GRACE embeddings (greedy rationales, as evaluated),
    with gradients through the encoder's hidden states instead of through rationale log-probs."""
    B, t0 = len(batch), time.perf_counter()
    texts = [r[k] for k in ("query", "positive", "negative") for r in batch]
    encoded = encode(model, tok, texts, args, n=1, temperature=0.0)  # rationales: no gradient
    t1 = time.perf_counter()
    model.train(args.grad_checkpointing)
    ro = encoded.rollout
    for _ in range(args.ppo_epochs):  # optimizer steps on this batch (its rationales are fixed)
        hidden = policy.hidden_states(model, ro.sequences, ro.attention_mask)  # (3B, T, H)
        emb = policy.mean_pool(hidden, encoded.pool_mask)  # (3B, H), with grad
        loss = contrastive_loss(emb[:B], emb[B:2 * B], emb[2 * B:], args.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = step_optimizer(model, opt, args, world, bool(torch.isfinite(loss)))
    model.eval()
    with torch.no_grad():
        hits = (emb[:B] @ emb[B:].T).argmax(-1) == torch.arange(B, device=emb.device)
    about, rationales = diagnostics.rationale_metrics(tok, ro)
    metrics = dict(loss=loss.item(), accuracy=hits.float().mean().item(), grad_norm=grad_norm,
                   skipped=int(not math.isfinite(grad_norm)), **about,
                   prompts_cut=int(encoded.prompts_cut.sum()), t_rollout=t1 - t0,
                   t_update=time.perf_counter() - t1,
                   tokens_per_s=ro.completion_mask.sum().item() / (t1 - t0),
                   cos_between_texts=diagnostics.cos_between_texts(encoded.embeddings[B:2 * B]))
    return metrics, (batch[0], rationales[B])


def encode(model, tok, texts, args, stale=True, **kw):
    """policy.encode with this run's settings (prompt, its limit, length, nucleus, chunking).
    --compile on: the compiled decode step (infra/fast_decode.py). --fsdp: rationales are sampled
    from a plain copy of the sharded weights (bf16 Linears on GPU), refreshed unless the caller says
    no optimizer step came since the last call (stale=False; a collective either way)."""
    sampler = model
    if args.fsdp:
        sampler = fsdp.sampler(model, args.device, policy.low_precision(args.device), stale)
    step = fast_decode.static_step(sampler) if args.compile == "on" else rollout.plain_step(sampler)
    return policy.encode(model, tok, texts, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                         top_k=args.top_k, max_length=args.max_prompt_tokens,
                         system_prompt=args.system_prompt,
                         chunk_rows=args.micro_batch_size * args.group_size,
                         sample_rows=args.rollout_rows or None, step=step,
                         device=next(sampler.parameters()).device, **kw)


@torch.no_grad()
def sts_spearman(model, tok, pairs, args):
    """Spearman of cos(h1, h2) against the gold scores, greedy rationales through policy.encode: a
    quick in-training check (evaluate.py is the real evaluation)."""
    texts = [p[0] for p in pairs] + [p[1] for p in pairs]
    e = torch.cat([encode(model, tok, texts[s:s + 32], args, temperature=0.0, stale=s == 0)
                   .embeddings for s in range(0, len(texts), 32)]).double().cpu()
    cos = (e[:len(pairs)] * e[len(pairs):]).sum(-1)
    return diagnostics.spearman(cos, torch.tensor([p[2] for p in pairs]))


# ----------------------------------------------------------------------------- the loop

def run(args, given=frozenset()):
    rank, world, args.device = dist.setup(args.device, args.threads)
    out = Path(args.out)
    records, model, tok, ref, opt, state, sts = prepare(args, given, world, rank)  # bad input: stop
    with runfolder.lock(out) if rank == 0 else contextlib.nullcontext():  # one run per folder
        if rank == 0:
            runfolder.start(out, state["step"] if args.resume else None, args)
        generator = torch.Generator(device=args.device).manual_seed(args.seed + rank)  # own samples
        if state.get("rng") and len(state["rng"]) == world:  # (other number of ranks: fresh seeds)
            runfolder.set_rng_state(state.pop("rng")[rank], generator)
        step_fn = contrastive_step if args.objective == "contrastive" else rl_step
        stop = dist.catch_signals()
        report = runfolder.Reporter(out, args, state["step"], rank)  # jsonl, bar, tensorboard
        try:
            while state["step"] < args.steps:
                batch = next_batch(records, state, args, rank, world)
                try:
                    metrics, (record, rationale) = step_fn(model, ref, tok, opt, batch, args,
                                                           generator, world)
                except FloatingPointError as e:
                    raise TrainingError(f"step {state['step'] + 1}: {e} (try a lower --lr); the "
                                        f"checkpoints already saved in {out} are kept") from None
                state["step"] += 1
                metrics["peak_mem_mb"] = dist.peak_memory_mb()
                if sts is not None and state["step"] % args.eval_every == 0:
                    metrics["sts_dev"] = 100 * sts_spearman(model, tok, sts, args)  # evaluate's
                metrics = dist.average_over_ranks(dict(metrics, stop=float(bool(stop))), world)
                state["prompts_cut"] += round(metrics.pop("prompts_cut") * world)
                stopping = metrics.pop("stop") > 0 and state["step"] < args.steps  # done: just end
                if rank == 0:
                    report.step(state, metrics, record, rationale)
                count_nonfinite(state, metrics)  # after logging: the metrics show the skipped steps
                if stopping or state["step"] % args.save_every == 0 or state["step"] == args.steps:
                    runfolder.save_step(out, model, tok, opt, state, args, generator, rank, world)
                if stopping:
                    if rank == 0:
                        tqdm.write(f"interrupted: saved {out}/step-{state['step']}; "
                                   "--resume continues from it")
                    raise KeyboardInterrupt
        finally:
            report.close()
            stop.restore()
        runfolder.export(out, model, tok, state, args, rank)


def next_batch(records, state, args, rank, world):
    """This rank's records of the next rollout batch; a fresh seeded shuffle each epoch."""
    while True:
        order = torch.randperm(len(records),
                               generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        if state["position"] + args.batch_size <= len(order):
            break
        state["epoch"], state["position"] = state["epoch"] + 1, 0
    local = args.batch_size // world  # shard by group: each rank rolls out and rewards its texts
    batch = order[state["position"]:state["position"] + args.batch_size]
    idx = batch[rank * local:(rank + 1) * local]
    state["position"] += args.batch_size
    return [records[i] for i in idx]


def count_nonfinite(state, metrics):
    """Skipped (non-finite) steps in a row; MAX_NONFINITE_IN_ROW of them stop the run."""
    bad = metrics.get("skipped", 0) > 0
    state["skipped"] = state.get("skipped", 0) + int(bad)
    state["skipped_in_row"] = state.get("skipped_in_row", 0) + 1 if bad else 0
    if state["skipped_in_row"] >= MAX_NONFINITE_IN_ROW:
        raise TrainingError(f"{MAX_NONFINITE_IN_ROW} steps in a row had a non-finite loss or "
                            f"gradient (NaN/inf), up to step {state['step']}: stopping without "
                            "saving them (try a lower --lr, a larger --tau or a smaller --kl-coef)")


# ----------------------------------------------------------------------------- setup

def prepare(args, given, world, rank):
    """Everything that can fail on bad input, before anything is written: settings, data, models,
    optimizer, the resumed state. -> (records, model, tokenizer, reference or None, optimizer,
    state, sts pairs or None)."""
    state, resume_from, saved, loaded = runfolder.resume(args, given, rank, world)  # saved wins
    records = data.load_records(args.data, args.mode)
    cli.check_run(args, given, world, len(records))  # --fsdp, the batch sizes over the ranks
    args.steps = args.steps or max(1, args.epochs * len(records) // args.batch_size)
    sts = data.load_sts_pairs(args.eval_data, args.eval_pairs) if args.eval_every else None
    model, tok, ref = load_models(args, loaded)
    torch.manual_seed(args.seed), random.seed(args.seed)
    opt = runfolder.optimizer(model, args, saved)  # AdamW; resumed: the saved state
    if rank == 0:
        runfolder.announce(args, len(records), world, resume_from)
    return records, model, tok, ref, opt, state, sts


def load_models(args, resumed=None):
    """The policy (resumed: the checkpoint's) and the KL reference unless --kl-coef 0 or --objective
    contrastive: the base model (bf16 on GPU: it never steps); --lora-rank: the policy, no copy."""
    try:
        model, tok = resumed or policy.load(args.model, device=args.device, seed=args.seed)
        if args.lora_rank and not resumed:  # W frozen; A drawn from --seed, B = 0
            lora.add(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                     seed=args.seed)
        ref = model if args.lora_rank and args.kl_coef and args.objective == "grpo" else None
        if ref is None and args.kl_coef and args.objective == "grpo":  # (LoRA: rl_step's disabled)
            ref, _ = policy.load(args.model, device=args.device, seed=args.seed,
                                 dtype=policy.low_precision(args.device))
            ref.eval().requires_grad_(False)
    except (FileNotFoundError, ValueError) as e:  # ValueError: --lora-targets that match nothing
        raise UsageError(str(e)) from e
    cli.check_lengths(args, model, tok)  # the template fits the prompt limit, all the positions
    disable_dropout(model)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.eval()
    if args.fsdp:  # the reference stays whole (bf16 on GPU): no_grad only, no collectives
        fsdp.shard(model, args.device, offload=args.offload)
    return model, tok, ref


def disable_dropout(model):
    """RL scores the same tokens several times (sampling, old, new): dropout makes them differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def main(argv=None):
    console.quiet()  # third-party bars and known harmless warnings off
    args, given = cli.train_args(argv)
    try:
        run(args, given)
    except (UsageError, data.DataError, runfolder.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        dist.close()


if __name__ == "__main__":
    main()
