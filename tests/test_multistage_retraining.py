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
    settings = RetrainingSettings(documents=50, hidden_size=4, alpha=0.1, finetuning="broad")
    result = compare_influences(settings, progress=False)
    return {name: correlations(result["actual"], predicted) for name, predicted in result["predicted"].items()}


def test_exact_multistage_influence_predicts_retraining(comparison):
    assert comparison["exact multi-stage"]["pearson_pooled"] >= 0.9


# Known shortfall (benchmarks/multistage_retraining.py, benchmarks/results/multistage_retraining.json): on this
# 76-parameter problem EK-FAC multi-stage does not reliably beat single-stage EK-FAC. Within a query it ranks the 50
# documents barely better than chance (Pearson 0.07 for this seed) although the exact formula reaches 0.97, and over
# three seeds its pooled Pearson is 0.55, 0.29, -0.21. The fine-tuning factor α(H_ft + αI)⁻¹ amplifies the directions
# where EK-FAC misplaces H_ft's near-null space: its relative error on H_pt⁻¹∇ℓ is 0.7-1.0.
# strict=True: the day it passes, this marker must go.
@pytest.mark.xfail(strict=True, reason="EK-FAC multi-stage does not yet rank documents within a query better than single-stage EK-FAC here")
@pytest.mark.parametrize("rival", ["EK-FAC fine-tuned only", "EK-FAC pre-trained only"])
def test_ekfac_multistage_beats_single_stage_within_each_query(comparison, rival):
    assert comparison["EK-FAC multi-stage"]["pearson_per_query"] > comparison[rival]["pearson_per_query"]
