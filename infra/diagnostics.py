"""What training logs beside the loss: rationales, collapse, which reward terms steer, Spearman.

None of it changes a gradient. `collapse` is the one to watch: nothing in GRACE's supervised reward
pushes different texts apart (docs/reward-analysis.md), so the mean cosine between embeddings of
different texts is logged every step.
"""
import math

import torch

import policy
from infra import fast_decode
from infra.cli import UsageError
from infra.mteb_tasks import DEFAULT_MAX_LENGTH


def rationale_stats(tokenizer, ro):
    """-> (texts, tokens (B,) long, empty (B,) bool) of every row of a Rollout: its decoded text
    (special tokens dropped), the tokens it wrote before its stop token, and whether it is empty
    (nothing but whitespace once decoded). Training's metrics and evaluation's summary use it."""
    texts = [tokenizer.decode(seq[m.bool()], skip_special_tokens=True)
             for seq, m in zip(ro.sequences, ro.completion_mask)]
    n = ro.completion_mask.sum(-1)  # (B,) a finished row's last token is its EOS: not counted
    tokens = n - (~ro.truncated & (n > 0)).long()
    return texts, tokens, torch.tensor([not t.strip() for t in texts], dtype=torch.bool)


def rationale_metrics(tok, ro):
    """Mean rationale length (tokens before the stop token) and the shares of empty rationales (a
    policy that learns to write nothing is the first hack to rule out) and of truncated ones,
    counted as evaluate.py counts them (rationale_stats). -> (metrics, decoded rationales)"""
    texts, tokens, empty = rationale_stats(tok, ro)
    return dict(rationale_len=tokens.float().mean().item(), empty_frac=empty.float().mean().item(),
                truncated_frac=ro.truncated.float().mean().item()), texts


def rl_metrics(tok, main, side, rewards, parts, adv, stats, times, G, penalised=None):
    """What train.rl_step logs: the reward and its terms, the advantages, the rationales, the
    seconds of each stage, the loss statistics and the collapse. penalised: (N,) bool, the rows
    whose reward the length penalty replaced (None: no penalty). -> (metrics, decoded rationales)"""
    t0, t1, t2, t3 = times
    ro = main.rollout
    about, rationales = rationale_metrics(tok, ro)
    metrics = dict(reward=rewards.mean().item(),
                   **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
                   adv_abs=adv.abs().mean().item(), adv_std=adv.std(unbiased=False).item(),
                   **about,
                   prompts_cut=int(main.prompts_cut.sum() + side.prompts_cut.sum()),
                   t_rollout=t1 - t0, t_score=t2 - t1, t_update=t3 - t2,
                   tokens_per_s=ro.completion_mask.sum().item() / (t1 - t0),
                   compilations=fast_decode.compilations(), **stats,
                   **collapse(main.embeddings, parts, G, ro, rewards, penalised))
    return metrics, rationales


def cos_between_texts(emb, group_size=1):
    """Mean cosine between embeddings of different texts (rows of different groups):
    collapse -> 1."""
    group = torch.arange(emb.shape[0], device=emb.device) // group_size
    different = group[:, None] != group[None, :]
    return (emb @ emb.T)[different].mean().item() if different.any() else float("nan")


def collapse(main, parts, G, ro, rewards=None, penalised=None):
    """Collapse (cosine between different texts), diversity (within a group), and per reward term
    the share of its variance that is within groups: the only part a group baseline passes on.

    Measured on what reaches the advantage: on a row the length penalty replaced (penalised, (N,)
    bool) every term's value is 0, and the penalty (that row's reward, else 0) is a part of its
    own, within_share/length_penalty (logged whenever penalised is given, so every rank and step
    logs the same keys)."""
    n = main.shape[0] // G
    group = torch.arange(main.shape[0], device=main.device) // G
    same_not_self = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool,
                                                                    device=main.device)
    out = {"cos_between_texts": cos_between_texts(main, G),
           "cos_within_group": (main @ main.T)[same_not_self].mean().item() if G > 1
                               else float("nan")}
    effective = {k: v for k, v in parts.items() if k != "truncated"}
    if penalised is not None:
        cut = penalised.bool()
        effective = {k: torch.where(cut, 0.0, v.float()) for k, v in effective.items()}
        effective["length_penalty"] = torch.where(cut, rewards.float(), 0.0)
    for k, v in effective.items():
        total = v.var(unbiased=False).item()
        within = v.reshape(n, G).var(-1, unbiased=False).mean().item()
        out[f"within_share/{k}"] = within / total if total > 1e-12 else 0.0
    distinct = [len(set(s[m.bool()].tolist())) / max(1, int(m.sum()))
                for s, m in zip(ro.sequences, ro.completion_mask)]
    out["distinct_token_ratio"] = sum(distinct) / len(distinct)
    return out


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
    sums = torch.zeros(int(inv.max()) + 1, dtype=x.dtype).index_add_(0, inv, ranks)
    return (sums / torch.bincount(inv))[inv]


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size=16, max_length=DEFAULT_MAX_LENGTH):
    """exp(mean negative log-likelihood per token) of plain texts, teacher-forced: each text as is
    (no chat template, the tokenizer's special tokens, no EOS) cut to max_length; every token but
    the first is scored, the mean is over all scored tokens."""
    device = next(model.parameters()).device
    ids = tokenizer([str(t) for t in texts], add_special_tokens=True, truncation=True,
                    max_length=max_length)["input_ids"]
    nll, count = 0.0, 0
    for s in range(0, len(ids), batch_size):
        rows = ids[s:s + batch_size]
        width = max(len(r) for r in rows)
        seqs = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(seqs)
        for i, r in enumerate(rows):  # left-padded, as everywhere in the project
            seqs[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        scored = mask.clone()
        firsts = width - torch.tensor([len(r) for r in rows])
        scored[torch.arange(len(rows)), firsts] = 0  # each text's first token has no prefix
        logp = policy.token_logprobs(model, seqs.to(device), mask.to(device), scored.to(device))
        nll -= logp.double().sum().item()
        count += int(scored.sum())
    if count == 0:
        raise UsageError("perplexity: no text has two or more tokens")
    return math.exp(nll / count)
