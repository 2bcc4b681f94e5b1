"""infra/diagnostics.py: what training logs beside the loss, against independent computations."""
import pytest
import torch

from infra import diagnostics


def test_in_training_spearman_matches_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=g).double()  # many ties, like STS gold scores
    y = x + torch.randn(200, generator=g, dtype=torch.float64) * 2
    assert diagnostics.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-9)


def test_within_share_is_measured_on_what_reaches_the_advantage():
    """On a row the length penalty replaced, every term counts 0 there (the -1 replaced the whole
    total) and the penalty is a part of its own: s_neg, one value per group, then varies within
    the group that holds the truncated row. Fully finished: its within share is exactly 0."""
    from types import SimpleNamespace

    import reward

    g = torch.Generator().manual_seed(0)

    def unit(n):
        x = torch.randn(n, 8, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    q, neg, main = unit(3).repeat_interleave(4, 0), unit(3).repeat_interleave(4, 0), unit(12)
    ro = SimpleNamespace(sequences=torch.randint(0, 50, (12, 6), generator=g),
                         completion_mask=torch.ones(12, 6))
    for cut in (torch.zeros(12, dtype=torch.bool), torch.tensor([True] + [False] * 11)):
        rewards, parts = reward.grace_rewards(q, main, neg, 4, truncated=cut)
        out = diagnostics.collapse(main, parts, 4, ro, rewards, cut)
        if cut.any():
            assert out["within_share/negative"] > 0 and out["within_share/cross_group"] > 0
            # the penalty, -1 on row 0 and 0 elsewhere, by hand: total variance 1/12 - 1/144 =
            # 11/144; within, the mean of the group variances (3/16, 0, 0) = 1/16: share 9/11
            assert out["within_share/length_penalty"] == pytest.approx(9 / 11)
        else:
            assert out["within_share/negative"] == 0.0
            assert out["within_share/length_penalty"] == 0.0  # logged, nothing penalised
        assert 0 < out["within_share/positive"] <= 1
    # no length penalty: the parts are the totals' terms as they are, no penalty part
    out = diagnostics.collapse(main, parts, 4, ro)
    assert out["within_share/negative"] == 0.0 and "within_share/length_penalty" not in out
