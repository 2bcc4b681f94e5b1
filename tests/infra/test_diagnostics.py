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
