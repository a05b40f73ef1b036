"""Multi-stage influence against retraining both stages without each of 50 pre-training documents."""

import pytest
import torch

from pretrace.bench.retraining import RetrainingSettings, compare_influences, correlations, hessian, newton_minimise


def test_newton_minimise_matches_closed_form_of_regularised_logistic_regression():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 2, (40,)).double()
    objective = lambda w: torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 0.05 * w.square().sum()
    solution = newton_minimise(objective, torch.zeros(5, dtype=torch.float64))
    # Stationarity, written out by hand: Xᵀ(σ(Xw) − y)/n + 0.1 w = 0.
    assert torch.allclose(x.T @ (torch.sigmoid(x @ solution) - y) / 40 + 0.1 * solution, torch.zeros(5, dtype=torch.float64), atol=1e-9)
    expected = x.T @ torch.diag(torch.sigmoid(x @ solution) * (1 - torch.sigmoid(x @ solution))) @ x / 40 + 0.1 * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(hessian(objective, solution), expected, atol=1e-12)


@pytest.fixture(scope="module")
def comparison():
    torch.set_num_threads(1)
    settings = RetrainingSettings(documents=50, hidden_size=4)
    result = compare_influences(settings, progress=False)
    return {name: correlations(result["actual"], predicted) for name, predicted in result["predicted"].items()}


def test_exact_multistage_influence_predicts_retraining(comparison):
    assert comparison["exact multi-stage"]["pearson_pooled"] >= 0.9


# Known failure (see benchmarks/multistage_retraining.py): with α = 1e-2 the fine-tuning factor α(G_ft + α)⁻¹ is
# nearly a projector onto directions the 6 fine-tuning pairs leave flat, and EK-FAC's Kronecker eigenbasis
# places that null space badly (dense GGN in place of both Hessians still tracks retraining), so EK-FAC
# multi-stage scores anti-correlate with retraining. strict=True: the day it passes, this marker must go.
@pytest.mark.xfail(strict=True, reason="EK-FAC multi-stage does not yet track retraining on this problem")
@pytest.mark.parametrize("rival", ["EK-FAC fine-tuned only", "EK-FAC pre-trained only", "gradient dot product"])
def test_ekfac_multistage_beats_single_stage_and_gradient_dot(comparison, rival):
    assert comparison["EK-FAC multi-stage"]["pearson_pooled"] > comparison[rival]["pearson_pooled"]
