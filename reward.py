"""GRACE's contrastive rewards: one scalar per main rollout, computed from embeddings.

Every input is an (N, H) tensor of L2-normalised embeddings laid out group by group: N = n groups x
G, rows g*G .. g*G+G-1 are group g (the G rationales of one text). `query` and `negative` hold the
group's one query / negative embedding repeated on each of its G rows (as the release lays them
out). For unit vectors cos(a, b) = a . b, so every term is a dot product. Pure tensor math,
float32, no loops.

    supervised    r_i = s_pos + s_neg + w_clu s_clu + w_x s_x [+ w_ib s_ib]  (grace_rewards)
    unsupervised  r_i = s_pos + w_clu s_clu - w_x s_x                    (unsupervised_rewards)
    infonce       r_i = log softmax_c(cos(m_i, c) / tau)[own query]      (infonce_rewards)

REWARDS is train.py's table (--reward NAME): fn(query, main, negative, group_size, *, temperature,
truncated, length_penalty, **options), negative None when unsupervised; flags set the keyword
options (one the reward does not take is refused). A new reward: a function and a table line.
As released, the supervised s_x is the *largest* similarity between a group's query and another
group's rollouts (never main_i), the unsupervised s_x the *mean* of main_i vs the other queries.

What reaches the gradient: GRPO subtracts each group's mean reward. In the supervised reward s_neg
and s_x are the same for all G members of a group, so in a group where every rollout finished they
cancel exactly: they move the logged reward, never the policy (with a truncated rollout they set
how large its -1 effectively is). Only s_pos, s_clu and the length penalty steer, and neither pushes
different texts apart (docs/reward-analysis.md): the space collapses. The optional in-batch term
s_ib (--in-batch-weight, off as released) involves main_i, so it varies within the group and pushes
each rollout away from the other groups' queries. infonce_rewards is the per-rollout alternative.
"""
import torch


def _groups(x, group_size):  # (N, H) -> (n, G, H), float32
    return x.float().reshape(-1, group_size, x.shape[-1])


def _check(group_size, truncated, temperature, **embeddings):
    """ValueError naming the problem: group_size, temperature, shapes, divisibility, truncated."""
    if isinstance(group_size, bool) or not hasattr(group_size, "__index__") or \
            group_size.__index__() < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    shapes = {k: tuple(v.shape) for k, v in embeddings.items() if v is not None}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (N, H), got shape {shape}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"embeddings must all have the same shape (N, H), got {shapes}")
    N = shapes["main"][0]
    if N == 0 or N % group_size:
        raise ValueError(f"N = {N} rows (main has shape {shapes['main']}) is not a positive "
                         f"multiple of group_size = {group_size}")
    if truncated is not None and tuple(truncated.shape) != (N,):
        raise ValueError(f"truncated must have shape ({N},) (one flag per main row), "
                         f"got {tuple(truncated.shape)}")


# ----------------------------------------------------------------------------- the terms (unscaled)

def positive_term(query, main):
    """s_pos_i = cos(q_g(i), m_i)"""
    return (query.float() * main.float()).sum(-1)  # (N,)


def negative_term(query, negative):
    """s_neg_i = -cos(q_g(i), n_g(i))  (one value per group: cancels in the group advantage)"""
    return -(query.float() * negative.float()).sum(-1)  # (N,)


def clustering_term(main, group_size):
    """s_clu_i = 1/(G-1) sum_{j != i in group} cos(m_i, m_j); 0 when G = 1."""
    if group_size == 1:
        return torch.zeros(main.shape[0], device=main.device)
    m = _groups(main, group_size)  # (n, G, H)
    sims = m @ m.transpose(1, 2)  # (n, G, G)
    off_diagonal = sims.sum(-1) - sims.diagonal(dim1=1, dim2=2)  # (n, G): sum over j != i
    return (off_diagonal / (group_size - 1)).reshape(-1)


def _mean_over_other_groups(x):
    """x: (n, n) -> (n,) row means over the off-diagonal entries (0 when n = 1)."""
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, device=x.device)
    return (x.sum(-1) - x.diagonal()) / (n - 1)


def cross_group_supervised(query, main, group_size):
    """s_x_i = -1/(n-1) sum_{g' != g(i)} max_k cos(q_g(i), m_{g',k}); 0 with one group.
    No main_i of group g in it: one value per group, so it cancels in the group advantage."""
    q = _groups(query, group_size)[:, 0]  # (n, H): each group's query
    m = _groups(main, group_size)  # (n, G, H)
    hardest = torch.einsum("ah,bkh->abk", q, m).amax(-1)  # (n, n): [g, g'] = max_k cos(q_g, m_g'k)
    return -_mean_over_other_groups(hardest).repeat_interleave(group_size)


def cross_group_unsupervised(query, main, group_size):
    """s_x_i = 1/(n-1) sum_{g' != g(i)} cos(m_i, q_g')  (the caller subtracts it); 0 with 1 group.
    Involves main_i, so unlike the supervised s_x it varies within a group and steers the policy."""
    q = _groups(query, group_size)[:, 0]  # (n, H)
    m = _groups(main, group_size)  # (n, G, H)
    sims = torch.einsum("akh,bh->akb", m, q)  # (n, G, n): [g, k, g'] = cos(m_gk, q_g')
    n = q.shape[0]
    if n == 1:
        return torch.zeros(main.shape[0], device=main.device)
    own = sims.diagonal(dim1=0, dim2=2).T  # (n, G): cos(m_gk, q_g)
    return ((sims.sum(-1) - own) / (n - 1)).reshape(-1)


# ----------------------------------------------------------------------------- the rewards

def _finish(total, parts, truncated, length_penalty, below_all=False):
    """r_i = -1 (not / tau, as released) for rollouts that hit the length limit without EOS.
    below_all: min(-1, lowest finished reward - 1) instead, for rewards that sit below -1 themselves
    (InfoNCE). The parts keep the terms' values on those rows; only the total is replaced."""
    if truncated is not None:
        parts["truncated"] = truncated.float()
        if length_penalty:
            cut = truncated.bool()
            penalty = torch.tensor(-1.0, device=total.device)
            if below_all and not cut.all():
                penalty = torch.minimum(penalty, total[~cut].min().detach() - 1)
            total = torch.where(cut, penalty, total)
    return total, parts


def grace_rewards(query, main, negative, group_size, *, temperature=0.1, with_scale=True,
                  clustering_weight=0.2, cross_group_weight=0.2, in_batch_weight=0.0,
                  truncated=None, length_penalty=True):
    """Supervised GRACE reward -> (rewards (N,), parts).
    r_i = s_pos + s_neg + w_clu s_clu + w_x s_x + w_ib s_ib, every term / tau when with_scale, with
    s_ib_i = -1/(n-1) sum_{g' != g(i)} cos(m_i, q_g') (not in the release: w_ib 0 leaves it out).
    parts holds each term as it enters the sum before its weight (scaled, unweighted): positive,
    negative, clustering, cross_group, in_batch (when w_ib != 0), truncated (0/1) when given.
    """
    _check(group_size, truncated, temperature, query=query, main=main, negative=negative)
    scale = 1.0 / temperature if with_scale else 1.0
    parts = {
        "positive": positive_term(query, main) * scale,
        "negative": (negative_term(query, negative) if negative is not None
                     else torch.zeros(main.shape[0], device=main.device)) * scale,
        "clustering": clustering_term(main, group_size) * scale,
        "cross_group": cross_group_supervised(query, main, group_size) * scale,
    }
    total = (parts["positive"] + parts["negative"] + clustering_weight * parts["clustering"]
             + cross_group_weight * parts["cross_group"])
    if in_batch_weight:  # the unsupervised s_x with a minus: main_i vs the other groups' queries
        parts["in_batch"] = -cross_group_unsupervised(query, main, group_size) * scale
        total = total + in_batch_weight * parts["in_batch"]  # (below -1: a fixed -1 would pay)
    return _finish(total, parts, truncated, length_penalty, below_all=bool(in_batch_weight))


def unsupervised_rewards(query, main, group_size, *, temperature=0.1, with_scale=True,
                         clustering_weight=0.2, cross_group_weight=0.2, truncated=None,
                         length_penalty=True):
    """Unsupervised GRACE reward -> (rewards (N,), parts). The text's own low-temperature rationale
    is the query. r_i = s_pos + w_clu s_clu - w_x s_x, every term / tau when with_scale.
    parts: positive, clustering, cross_group (scaled, unweighted, before the minus), truncated."""
    _check(group_size, truncated, temperature, query=query, main=main)
    scale = 1.0 / temperature if with_scale else 1.0
    parts = {
        "positive": positive_term(query, main) * scale,
        "clustering": clustering_term(main, group_size) * scale,
        "cross_group": cross_group_unsupervised(query, main, group_size) * scale,
    }
    total = (parts["positive"] + clustering_weight * parts["clustering"]
             - cross_group_weight * parts["cross_group"])
    return _finish(total, parts, truncated, length_penalty)


def infonce_rewards(query, main, negative, group_size, *, temperature=0.1, truncated=None,
                    length_penalty=True):
    """Per-rollout contrastive reward -> (rewards (N,), parts).
    r_i = cos(m_i, q_g(i))/tau - logsumexp_c cos(m_i, c)/tau, over the candidates c = every group's
    query and (when given) every group's negative: the log-probability that main_i picks out its own
    query; r_i <= 0. A truncated rollout gets min(-1, the lowest finished reward - 1): these
    rewards sit below -1 (chance is -log C), so a fixed -1 would be a bonus for never stopping.
    parts: positive (the first term), logsumexp (the second, subtracted), truncated; both / tau.
    negative=None: the queries are the only candidates. No scale switch, no weights (TypeError).
    """
    _check(group_size, truncated, temperature, query=query, main=main, negative=negative)
    candidates = _groups(query, group_size)[:, 0]  # (n, H): own query of group g is candidate g
    if negative is not None:
        candidates = torch.cat([candidates, _groups(negative, group_size)[:, 0]])  # (2n, H)
    logits = main.float() @ candidates.T / temperature  # (N, C)
    own = torch.arange(main.shape[0], device=main.device) // group_size  # (N,) group of each row
    parts = {
        "positive": logits.gather(1, own[:, None]).squeeze(1),
        "logsumexp": logits.logsumexp(-1),
    }
    return _finish(parts["positive"] - parts["logsumexp"], parts, truncated, length_penalty,
                   below_all=True)


# ----------------------------------------------------------------------------- train.py's table

def release_rewards(query, main, negative, group_size, *, temperature=0.1, with_scale=True,
                    clustering_weight=0.2, cross_group_weight=0.2, in_batch_weight=0.0,
                    truncated=None, length_penalty=True):
    """GRACE's reward as released: supervised with a negative, unsupervised without one (whose s_x
    is already the in-batch term: in_batch_weight is supervised only)."""
    kw = dict(temperature=temperature, with_scale=with_scale, clustering_weight=clustering_weight,
              cross_group_weight=cross_group_weight, truncated=truncated,
              length_penalty=length_penalty)
    if negative is None:
        if in_batch_weight:
            raise ValueError("in_batch_weight is for the supervised reward (with a negative)")
        return unsupervised_rewards(query, main, group_size, **kw)
    return grace_rewards(query, main, negative, group_size, in_batch_weight=in_batch_weight, **kw)


REWARDS = {"release": release_rewards, "infonce": infonce_rewards}
