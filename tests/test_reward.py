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
    """log softmax over the candidates (every group's query, then every group's negative), own query."""
    groups = len(m) // G
    out = {k: [] for k in ("positive", "logsumexp", "total")}
    for i in range(len(m)):
        cands = [q[h * G] for h in range(groups)] + ([n[h * G] for h in range(groups)] if n is not None else [])
        logits = [cos(m[i], c) / tau for c in cands]
        lse = math.log(sum(math.exp(x) for x in logits))
        for k, v in dict(positive=logits[i // G], logsumexp=lse, total=logits[i // G] - lse).items():
            out[k].append(v)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


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
    ref = loop_infonce(q, m, n, G, 0.1)
    assert r.dtype == torch.float32
    for k in ("positive", "logsumexp"):
        assert torch.allclose(parts[k].double(), ref[k], atol=1e-4), k
    assert torch.allclose(r.double(), ref["total"], atol=1e-4)
    assert (r <= 1e-6).all()  # a log-probability
    if groups == 1 and not with_negative:
        assert torch.equal(r, torch.zeros_like(r))  # one candidate: probability 1


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
    for fn, args in ((reward.grace_rewards, (q, m, n)), (reward.unsupervised_rewards, (q, m))):
        r, parts = fn(*[a.float() for a in args], 4, truncated=truncated)
        assert (r[truncated] == -1.0).all()
        assert (r[~truncated] != -1.0).all()
        assert torch.equal(parts["truncated"], truncated.float())
        r_off, _ = fn(*[a.float() for a in args], 4, truncated=truncated, length_penalty=False)
        assert (r_off[truncated] != -1.0).all()


def test_infonce_truncation_never_pays():
    """InfoNCE rewards are log-probabilities, below -1 at chance (-log C): a fixed -1 for a truncated
    rollout would be a bonus. It gets min(-1, lowest finished reward - 1) instead, computed by hand here."""
    q, m, n = layout(2, 4)
    truncated = torch.tensor([True, False, False, True, False, False, False, True])
    free, _ = reward.infonce_rewards(q.float(), m.float(), n.float(), 4)  # without the penalty
    assert (free < -1).any()  # the case that matters: rewards below the release's -1
    r, _ = reward.infonce_rewards(q.float(), m.float(), n.float(), 4, truncated=truncated)
    expected = min(-1.0, free[~truncated].min().item() - 1)
    assert torch.allclose(r[truncated], torch.full((3,), expected))
    assert torch.equal(r[~truncated], free[~truncated]) and (r[truncated] < r[~truncated].min()).all()
    everything_cut, _ = reward.infonce_rewards(q.float(), m.float(), n.float(), 4, truncated=torch.ones(8, dtype=torch.bool))
    assert (everything_cut == -1.0).all()


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


def test_unsupervised_hand_case_with_stated_values():
    # 2 groups of G = 2 in 3-D, tau = 0.1; queries e0 (group 0) and e1 (group 1).
    e = torch.eye(3)
    q = torch.stack([e[0], e[0], e[1], e[1]])
    m = torch.stack([e[0], e[1], e[2], e[2]])
    r, parts = reward.unsupervised_rewards(q, m, 2)
    assert parts["positive"].tolist() == pytest.approx([10.0, 0.0, 0.0, 0.0])
    assert parts["clustering"].tolist() == pytest.approx([0.0, 0.0, 10.0, 10.0])
    # row 1 (= e1) matches the other group's query: s_x = 1, subtracted; rows 2, 3 (= e2) match none
    assert parts["cross_group"].tolist() == pytest.approx([0.0, 10.0, 0.0, 0.0])
    assert r.tolist() == pytest.approx([10.0, -2.0, 2.0, 2.0])


def test_infonce_hand_case_with_stated_values():
    # 2 groups of G = 2 in 3-D, tau = 0.1; candidates: queries e0, e1 (no negative).
    e = torch.eye(3)
    q = torch.stack([e[0], e[0], e[1], e[1]])
    m = torch.stack([e[0], e[2], e[0], e[1]])  # own query / orthogonal to both / the other's query / own
    r, parts = reward.infonce_rewards(q, m, None, 2)
    sure = -math.log(1 + math.exp(-10))  # log softmax([10, 0])[0]
    assert r.tolist() == pytest.approx([sure, -math.log(2), -10 + sure, sure], abs=1e-6)  # float32
    assert parts["positive"].tolist() == pytest.approx([10.0, 0.0, 0.0, 10.0])


def test_supervised_group_constant_terms_cancel_in_the_advantage():
    """Changing every negative moves the supervised rewards but not reward - group mean."""
    q, m, n = (t.float() for t in layout(4, 4))
    r1, p1 = reward.grace_rewards(q, m, n, 4)
    r2, _ = reward.grace_rewards(q, m, torch.roll(n, 4, 0) * -1, 4)

    def centred(r):
        return r.reshape(4, 4) - r.reshape(4, 4).mean(-1, keepdim=True)

    assert (r1 - r2).abs().max() > 1.0
    assert torch.allclose(centred(r1), centred(r2), atol=1e-5)
    for k in ("negative", "cross_group"):
        assert centred(p1[k]).abs().max() < 1e-5, k


@pytest.mark.parametrize("kind", ["supervised", "unsupervised", "infonce"])
def test_bf16_inputs_compute_in_float32(kind):
    q, m, n = layout(3, 4)
    fn = {"supervised": lambda *a: reward.grace_rewards(a[0], a[1], a[2], 4),
          "unsupervised": lambda *a: reward.unsupervised_rewards(a[0], a[1], 4),
          "infonce": lambda *a: reward.infonce_rewards(a[0], a[1], a[2], 4)}[kind]
    r32, p32 = fn(q.float(), m.float(), n.float())
    r16, p16 = fn(q.bfloat16(), m.bfloat16(), n.bfloat16())
    assert r16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in p16.values())
    # bf16 keeps 8 bits of mantissa: each cosine moves by < ~0.01, i.e. < ~0.1 after / tau
    assert torch.allclose(r16, r32, atol=0.2)
    assert (r16 - r32).abs().max() > 0  # the inputs really were rounded


def test_bad_shapes_raise_clear_errors():
    q, m, n = (t.float() for t in layout(2, 4))  # N = 8, H = 6
    with pytest.raises(ValueError, match=r"N = 8 rows .*\(8, 6\).* multiple of group_size = 3"):
        reward.grace_rewards(q, m, n, 3)
    with pytest.raises(ValueError, match=r"same shape.*'query': \(8, 3\)"):
        reward.grace_rewards(q[:, :3], m, n, 4)
    with pytest.raises(ValueError, match=r"same shape.*'negative': \(4, 6\)"):
        reward.infonce_rewards(q, m, n[:4], 4)
    with pytest.raises(ValueError, match=r"query must be 2-D \(N, H\), got shape \(6,\)"):
        reward.unsupervised_rewards(q[0], m[0], 4)
    with pytest.raises(ValueError, match=r"truncated must have shape \(8,\).*got \(5,\)"):
        reward.grace_rewards(q, m, n, 4, truncated=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"truncated must have shape \(8,\).*got \(8, 1\)"):
        reward.unsupervised_rewards(q, m, 4, truncated=torch.zeros(8, 1, dtype=torch.bool))
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            reward.infonce_rewards(q, m, n, bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        reward.grace_rewards(q, m, n, 4, temperature=0.0)
    with pytest.raises(TypeError):  # a misspelt option is not swallowed
        reward.infonce_rewards(q, m, n, 4, temprature=0.1)


def test_with_a_truncated_row_the_group_constant_terms_reach_the_advantage():
    """The -1 of a truncated row replaces its whole reward, so the group constants (s_neg, s_x) sit
    on the finished rows only: flipping every negative changes the advantages of a group holding a
    truncated row, and of a fully finished batch it changes none. Float64 reference: the loops
    above, the -1, and A = r - group mean by hand."""
    import train

    q, m, n = layout(3, 4, seed=7)
    flipped = -n  # cos(q, -n) = -cos(q, n): s_neg changes sign
    for truncated in (torch.zeros(12, dtype=torch.bool),
                      torch.tensor([False, True, False, False] + [False] * 8)):
        adv = {}
        for name, neg in (("n", n), ("-n", flipped)):
            r, _ = reward.grace_rewards(q.float(), m.float(), neg.float(), 4, truncated=truncated)
            got = train.group_advantages(r, 4)
            total = loop_supervised(q, m, neg, 4, 0.1, True, 0.2, 0.2)["total"]
            total = torch.where(truncated, -1.0, total).reshape(3, 4)
            want = (total - total.mean(1, keepdim=True)).reshape(-1)  # by hand, float64
            assert torch.allclose(got.double(), want, atol=1e-4), (name, truncated)
            adv[name] = want
        moved = (adv["n"] - adv["-n"]).abs().reshape(3, 4).amax(1)
        if truncated.any():  # group 0 moves (by 3/4 and 1/4 of 2 cos(q, n) / tau), the rest not
            shift = 2 * cos(q[0], n[0]) / 0.1
            assert torch.allclose(adv["-n"][:4] - adv["n"][:4],
                                  torch.tensor([0.25, -0.75, 0.25, 0.25], dtype=torch.float64)
                                  * shift, atol=1e-9)
            assert moved[0] > 0.1 and moved[1:].max() < 1e-9
        else:
            assert moved.max() < 1e-9


@pytest.mark.parametrize("groups,G", SHAPES)
def test_in_batch_term_matches_loop_and_reaches_the_advantage(groups, G):
    """s_ib_i = -1/(n-1) sum_{g' != g} cos(m_i, q_g') / tau, added with weight w_ib; it varies
    within a group (so GRPO's advantage keeps it), and w_ib = 0 is the release's reward exactly."""
    q, m, n = layout(groups, G, seed=5)
    released, _ = reward.grace_rewards(q.float(), m.float(), n.float(), G, temperature=0.1)
    r, parts = reward.release_rewards(q.float(), m.float(), n.float(), G, temperature=0.1,
                                      in_batch_weight=0.5)
    s_ib = torch.zeros(groups * G, dtype=torch.float64)
    for i in range(groups * G):
        others = [cos(m[i], q[g * G]) for g in range(groups) if g != i // G]
        s_ib[i] = -sum(others) / len(others) / 0.1 if others else 0.0
    assert torch.allclose(parts["in_batch"].double(), s_ib, atol=1e-5)
    assert torch.allclose(r.double(), released.double() + 0.5 * s_ib, atol=1e-5)
    if groups > 1 and G > 1:
        adv = r - r.reshape(groups, G).mean(-1).repeat_interleave(G)
        adv0 = released - released.reshape(groups, G).mean(-1).repeat_interleave(G)
        assert (adv - adv0).abs().max() > 1e-3  # it steers, unlike s_neg and s_x
    with pytest.raises(ValueError, match="supervised"):
        reward.release_rewards(q.float(), m.float(), None, G, in_batch_weight=0.5)
    # a truncated rollout gets less than every finished one (s_ib sits below -1: a fixed -1 paid)
    cut = torch.zeros(groups * G, dtype=torch.bool)
    cut[0] = True
    r_cut, _ = reward.release_rewards(q.float(), m.float(), n.float(), G, temperature=0.1,
                                      in_batch_weight=5.0, truncated=cut)
    if groups * G > 1:
        assert r_cut[0] <= min(-1.0, r_cut[1:].min().item() - 1) + 1e-6
