"""GRACE's contrastive rewards: one scalar per main rollout, computed from embeddings.

Every input is an (N, H) tensor of L2-normalised embeddings laid out group by group: N = n groups x
G, rows g*G .. g*G+G-1 are group g (the G rationales of one text). `query` and `negative` hold the
group's one query / negative embedding repeated on each of its G rows (as the release lays them
out). For unit vectors cos(a, b) = a . b, so every term is a dot product. Pure tensor math,
float32, no loops.

    supervised    r_i = s_pos + s_neg + w_clu s_clu + w_x s_x          (grace_rewards)
    unsupervised  r_i = s_pos + w_clu s_clu - w_x s_x                  (unsupervised_rewards)
    infonce       r_i = log softmax_c(cos(m_i, c) / tau)[own query]    (infonce_rewards: not GRACE)

REWARDS is the table train.py chooses from (--reward NAME): every entry has the signature
fn(query, main, negative, group_size, *, temperature, truncated, length_penalty, **options), with
negative None in unsupervised mode; its keyword options are the ones flags may set (a flag the
chosen reward does not take is refused). A new reward is a function and one line in the table.
With with_scale every term is divided by tau; a rollout cut at the length limit gets -1 instead.

The two cross-group terms differ, as released: the supervised one is the *largest* similarity
between a group's query and another group's rollouts (it never involves main_i), the unsupervised
one the *mean* similarity between main_i and the other groups' queries (it does).

What reaches the gradient: GRPO subtracts each group's mean reward. In the supervised reward s_neg
and s_x are the same for all G members of a group, so in a group where every rollout finished they
cancel exactly: they move the logged reward, never the policy. In a group holding a truncated
rollout they do not: the -1 replaces that row's whole total, so the group constant s_neg + w_x s_x
sits on the finished rows only and sets how large the truncation penalty effectively is. Otherwise
only s_pos, s_clu and the length penalty steer, and neither pushes different texts apart
(docs/reward-analysis.md). infonce_rewards is the per-rollout alternative: every candidate
similarity involves main_i, so every part varies within the group.
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
                  clustering_weight=0.2, cross_group_weight=0.2, truncated=None,
                  length_penalty=True):
    """Supervised GRACE reward -> (rewards (N,), parts).
    r_i = s_pos + s_neg + w_clu s_clu + w_x s_x, every term / tau when with_scale.
    parts holds each term as it enters the sum before its weight (scaled, unweighted): positive,
    negative, clustering, cross_group, and truncated (0/1) when given. negative None: no term.
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
    return _finish(total, parts, truncated, length_penalty)


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
    query; r_i <= 0 (exactly 0 with one candidate). A truncated rollout gets min(-1, the lowest
    finished reward - 1): these rewards sit below -1 (chance is -log C), so a fixed -1 would be a
    bonus and the policy would learn never to stop.
    parts: positive (the first term), logsumexp (the second, subtracted), truncated; both / tau.
    negative=None gives the unsupervised variant (candidates are the queries only). It has no
    scale switch (the softmax always uses tau) and no weights: passing them is a TypeError.
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
                    clustering_weight=0.2, cross_group_weight=0.2, truncated=None,
                    length_penalty=True):
    """GRACE's reward as released: supervised with a negative, unsupervised without one."""
    kw = dict(temperature=temperature, with_scale=with_scale, clustering_weight=clustering_weight,
              cross_group_weight=cross_group_weight, truncated=truncated,
              length_penalty=length_penalty)
    if negative is None:
        return unsupervised_rewards(query, main, group_size, **kw)
    return grace_rewards(query, main, negative, group_size, **kw)


REWARDS = {"release": release_rewards, "infonce": infonce_rewards}
