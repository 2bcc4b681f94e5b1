"""reward.py against slow float64 loops written from method.md, and hand-made geometric cases."""
import math

import pytest
import torch

import reward

SHAPES = [(1, 1), (1, 4), (3, 1), (3, 4), (5, 8)]  # (groups, G): single group and G = 1 included


def unit(n, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def layout(groups, G, seed=0):
    """query / negative: one vector per group repeated on its G rows; main: one per row."""
    q = unit(groups, seed=seed).repeat_interleave(G, 0)
    n = unit(groups, seed=seed + 1).repeat_interleave(G, 0)
    m = unit(groups * G, seed=seed + 2)
    return q, m, n


def cos(a, b):
    return float(a @ b)


def loop_supervised(q, m, n, G, tau, scale, w_clu, w_x):
    """method.md, supervised, term by term with plain loops (float64)."""
    groups = len(m) // G
    out = {k: [] for k in ("positive", "negative", "clustering", "cross_group", "total")}
    for g in range(groups):
        for i in range(g * G, g * G + G):
            s_pos = cos(q[i], m[i])
            s_neg = -cos(q[i], n[i])
            others = [j for j in range(g * G, g * G + G) if j != i]
            s_clu = sum(cos(m[i], m[j]) for j in others) / len(others) if others else 0.0
            maxes = [max(cos(q[i], m[k]) for k in range(h * G, h * G + G)) for h in range(groups) if h != g]
            s_x = -sum(maxes) / len(maxes) if maxes else 0.0
            c = 1 / tau if scale else 1.0
            terms = dict(positive=s_pos * c, negative=s_neg * c, clustering=s_clu * c, cross_group=s_x * c)
            for k, v in terms.items():
                out[k].append(v)
            out["total"].append(terms["positive"] + terms["negative"] + w_clu * terms["clustering"]
                                + w_x * terms["cross_group"])
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def loop_unsupervised(q, m, G, tau, scale, w_clu, w_x):
    groups = len(m) // G
    out = {k: [] for k in ("positive", "clustering", "cross_group", "total")}
    for g in range(groups):
        for i in range(g * G, g * G + G):
            others = [j for j in range(g * G, g * G + G) if j != i]
            s_pos = cos(q[i], m[i])
            s_clu = sum(cos(m[i], m[j]) for j in others) / len(others) if others else 0.0
            reps = [cos(m[i], q[h * G]) for h in range(groups) if h != g]  # other groups' queries
            s_x = sum(reps) / len(reps) if reps else 0.0
            c = 1 / tau if scale else 1.0
            for k, v in dict(positive=s_pos * c, clustering=s_clu * c, cross_group=s_x * c).items():
                out[k].append(v)
            out["total"].append(c * (s_pos + w_clu * s_clu - w_x * s_x))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def loop_infonce(q, m, n, G, tau):
    groups = len(m) // G
    rewards = []
    for i in range(len(m)):
        cands = [q[h * G] for h in range(groups)] + ([n[h * G] for h in range(groups)] if n is not None else [])
        logits = [cos(m[i], c) / tau for c in cands]
        rewards.append(logits[i // G] - math.log(sum(math.exp(x) for x in logits)))
    return torch.tensor(rewards, dtype=torch.float64)


@pytest.mark.parametrize("groups,G", SHAPES)
@pytest.mark.parametrize("scale", [True, False])
def test_supervised_terms_match_loops(groups, G, scale):
    q, m, n = layout(groups, G)
    r, parts = reward.grace_rewards(q.float(), m.float(), n.float(), G, temperature=0.1, with_scale=scale,
                                    clustering_weight=0.2, cross_group_weight=0.3)
    ref = loop_supervised(q, m, n, G, 0.1, scale, 0.2, 0.3)
    assert r.dtype == torch.float32
    for k in ("positive", "negative", "clustering", "cross_group"):
        assert torch.allclose(parts[k].double(), ref[k], atol=1e-5), k
    assert torch.allclose(r.double(), ref["total"], atol=1e-5)


@pytest.mark.parametrize("groups,G", SHAPES)
@pytest.mark.parametrize("scale", [True, False])
def test_unsupervised_terms_match_loops(groups, G, scale):
    q, m, _ = layout(groups, G, seed=3)
    r, parts = reward.unsupervised_rewards(q.float(), m.float(), G, temperature=0.1, with_scale=scale,
                                           clustering_weight=0.2, cross_group_weight=0.3)
    ref = loop_unsupervised(q, m, G, 0.1, scale, 0.2, 0.3)
    for k in ("positive", "clustering", "cross_group"):
        assert torch.allclose(parts[k].double(), ref[k], atol=1e-5), k
    assert torch.allclose(r.double(), ref["total"], atol=1e-5)


@pytest.mark.parametrize("groups,G", SHAPES)
@pytest.mark.parametrize("with_negative", [True, False])
def test_infonce_matches_loop(groups, G, with_negative):
    q, m, n = layout(groups, G, seed=5)
    n = n if with_negative else None
    r, parts = reward.infonce_rewards(q.float(), m.float(), None if n is None else n.float(), G, temperature=0.1)
    assert torch.allclose(r.double(), loop_infonce(q, m, n, G, 0.1), atol=1e-4)
    assert (r <= 1e-6).all()  # a log-probability


def test_identical_beats_orthogonal_with_stated_values():
    # 2 groups of G = 2 in 3-D; group 0's query is e0, group 1's is e1.
    e = torch.eye(3)
    q = torch.stack([e[0], e[0], e[1], e[1]])
    n = torch.stack([e[2], e[2], e[2], e[2]])  # orthogonal to both queries: s_neg = 0
    m = torch.stack([e[0], e[1], e[1], e[1]])  # row 0 = its query, row 1 orthogonal to it
    r, parts = reward.grace_rewards(q, m, n, 2, temperature=0.1, with_scale=True,
                                    clustering_weight=0.2, cross_group_weight=0.2)
    assert parts["positive"].tolist() == pytest.approx([10.0, 0.0, 10.0, 10.0])
    assert parts["negative"].tolist() == pytest.approx([0.0] * 4)
    assert parts["clustering"].tolist() == pytest.approx([0.0, 0.0, 10.0, 10.0])
    # group 0: max_k cos(e0, group 1's mains) = 0; group 1: max_k cos(e1, [e0, e1]) = 1
    assert parts["cross_group"].tolist() == pytest.approx([0.0, 0.0, -10.0, -10.0])
    assert r.tolist() == pytest.approx([10.0, 0.0, 10.0 + 2.0 - 2.0, 10.0 + 2.0 - 2.0])
    assert r[0] > r[1]


def test_negative_equal_to_query_lowers_the_group_by_one_over_tau():
    q, m, n = layout(3, 4)
    r_orth, _ = reward.grace_rewards(q.float(), m.float(), torch.zeros_like(q).float(), 4)  # cos = 0
    n_same = n.clone()
    n_same[4:8] = q[4:8]  # group 1's negative is its query
    r_same, _ = reward.grace_rewards(q.float(), m.float(), n_same.float(), 4)
    r_base, _ = reward.grace_rewards(q.float(), m.float(), n.float(), 4)
    assert torch.allclose(r_same[4:8] - r_orth[4:8], torch.full((4,), -10.0), atol=1e-5)
    assert torch.allclose(r_same[:4], r_base[:4]) and torch.allclose(r_same[8:], r_base[8:])


def test_truncated_rows_get_exactly_minus_one():
    q, m, n = layout(2, 4)
    truncated = torch.tensor([True, False, False, True, False, False, False, True])
    for fn, args in ((reward.grace_rewards, (q, m, n)), (reward.unsupervised_rewards, (q, m)),
                     (reward.infonce_rewards, (q, m, n))):
        r, parts = fn(*[a.float() for a in args], 4, truncated=truncated)
        assert (r[truncated] == -1.0).all()
        assert (r[~truncated] != -1.0).all()
        assert torch.equal(parts["truncated"], truncated.float())
        r_off, _ = fn(*[a.float() for a in args], 4, truncated=truncated, length_penalty=False)
        assert (r_off[truncated] != -1.0).all()


def test_which_terms_vary_within_a_group():
    """Supervised s_neg and s_x are constant per group (they cancel in the advantage); the rest vary."""
    q, m, n = layout(4, 4)
    _, sup = reward.grace_rewards(q.float(), m.float(), n.float(), 4)
    _, uns = reward.unsupervised_rewards(q.float(), m.float(), 4)
    r_nce, _ = reward.infonce_rewards(q.float(), m.float(), n.float(), 4)

    def within_std(x):
        return x.reshape(4, 4).std(-1).max().item()

    assert within_std(sup["negative"]) == 0 and within_std(sup["cross_group"]) < 1e-6
    assert within_std(sup["positive"]) > 0.1 and within_std(sup["clustering"]) > 0.1
    assert within_std(uns["cross_group"]) > 0.1 and within_std(r_nce) > 0.1


def test_bf16_inputs_compute_in_float32():
    q, m, n = layout(3, 4)
    r32, _ = reward.grace_rewards(q.float(), m.float(), n.float(), 4)
    r16, _ = reward.grace_rewards(q.bfloat16(), m.bfloat16(), n.bfloat16(), 4)
    assert r16.dtype == torch.float32
    assert torch.allclose(r16, r32, atol=0.2)  # bf16 rounding of the inputs (8 bits), times 1/tau


def test_bad_shapes_raise_clear_errors():
    q, m, n = (t.float() for t in layout(2, 4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        reward.grace_rewards(q, m, n, 3)
    with pytest.raises(ValueError, match="same shape"):
        reward.grace_rewards(q[:, :3], m, n, 4)
    with pytest.raises(ValueError, match="2-D"):
        reward.unsupervised_rewards(q[0], m[0], 4)
    with pytest.raises(ValueError, match="truncated must have shape"):
        reward.grace_rewards(q, m, n, 4, truncated=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_size"):
        reward.infonce_rewards(q, m, n, 0)
