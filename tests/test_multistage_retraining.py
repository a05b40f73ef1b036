"""Multi-stage influence against retraining both stages without each of 50 pre-training documents."""

import pytest
import torch

from pretrace.bench.retraining import (RetrainingSettings, build_problem, compare_influences, correlations, hessian, newton_minimise,
                                       tracked_head)
from pretrace.data.batching import collate, encode_documents, encode_queries
from pretrace.errors import PretraceError
from pretrace.gradients.task import LanguageModelingTask
from pretrace.scores import query_gradients


def test_newton_minimise_matches_closed_form_of_regularised_logistic_regression():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 2, (40,)).double()
    objective = lambda w: torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 0.05 * w.square().sum()
    solution = newton_minimise(objective, torch.zeros(5, dtype=torch.float64))
    # Stationarity, written out by hand: Xᵀ(σ(Xw) − y)/n + 0.1 w = 0.
    assert torch.allclose(x.T @ (torch.sigmoid(x @ solution) - y) / 40 + 0.1 * solution, torch.zeros(5, dtype=torch.float64), atol=1e-9)
    expected = x.T @ torch.diag(torch.sigmoid(x @ solution) * (1 - torch.sigmoid(x @ solution))) @ x / 40 + 0.1 * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(hessian(objective, solution), expected, atol=1e-12)


def test_closed_form_head_losses_gradients_and_hessian_match_the_model_and_autograd():
    settings = RetrainingSettings(documents=8, document_length=10, vocabulary=8, pairs=4, queries=3, hidden_size=4, warmup_steps=10)
    problem, tokenizer, documents, _, queries = build_problem(settings)
    theta = problem.flat() + 0.3 * torch.randn(len(problem.flat()), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem.load(theta)
    with torch.no_grad():
        model_losses = LanguageModelingTask().document_loss(problem.model, collate(list(encode_documents(tokenizer, documents, 512)), 0))
    assert torch.allclose(problem.losses(theta, problem.documents), model_losses, atol=1e-12)
    # Query gradients through the model by pretrace's own capture, against the closed form Σ_t (p_t − e_y) ⊗ a_t.
    _, grads = query_gradients(problem.model, tracked_head(problem.model), [collate(list(encode_queries(tokenizer, queries, 512)), 0)])
    assert torch.allclose(problem.example_gradients(theta, problem.queries), grads["lm_head"].flatten(1), atol=1e-12)
    weights = torch.rand(problem.documents.count, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    autograd = hessian(lambda th: problem.pretrain_objective(th, weights), theta)
    assert torch.allclose(problem.pretrain_hessian(theta, weights), autograd, atol=1e-10)


@pytest.mark.parametrize("bad", [{"weight_decay": 0.0}, {"document_length": 1}, {"fisher": "exact"}, {"refine_iterations": 0}])
def test_bad_settings_are_refused_with_the_setting_named(bad):
    with pytest.raises(PretraceError, match=next(iter(bad))):
        RetrainingSettings(**bad)


# Every seed must pass (seeds 0-4 of the larger benchmark pass too); about 8 s of one core each.
@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda seed: f"seed{seed}")
def comparison(request):
    result = compare_influences(RetrainingSettings(documents=50, seed=request.param), progress=False)
    return {name: correlations(result["actual"], predicted) for name, predicted in result["predicted"].items()}


@pytest.mark.parametrize("metric", ["pearson_pooled", "pearson_per_query"])
def test_exact_multistage_influence_predicts_retraining(comparison, metric):
    assert comparison["exact multi-stage"][metric] >= 0.9


@pytest.mark.parametrize("metric", ["pearson_pooled", "pearson_per_query"])
@pytest.mark.parametrize("rival", ["EK-FAC fine-tuned only", "EK-FAC pre-trained only", "gradient dot product"])
def test_ekfac_multistage_beats_single_stage_and_gradient_dot_product(comparison, rival, metric):
    assert comparison["EK-FAC multi-stage"][metric] > comparison[rival][metric]


def test_refined_chain_converges_to_exact_multistage_influence():
    """ekfac-cg with enough iterations is the exact two-stage formula (dense solves with the closed-form Hessians)."""
    result = compare_influences(RetrainingSettings(documents=12, queries=3, refine_iterations=300), progress=False)
    refined, exact = result["predicted"]["EK-FAC-CG multi-stage (300 iterations)"], result["predicted"]["exact multi-stage"]
    assert float((refined - exact).norm() / exact.norm()) < 1e-6


@pytest.mark.parametrize("metric", ["pearson_pooled", "pearson_per_query"])
def test_refined_multistage_closes_most_of_ekfacs_gap(comparison, metric):
    """ekfac-cg's default 4 iterations per inverse lift EK-FAC multi-stage by a wide margin on every seed (here, 50
    documents: 0.48 → 0.81 on seed 0; the benchmark's 100 documents: 0.64–0.74 → 0.95–0.97)."""
    assert comparison["EK-FAC-CG multi-stage (4 iterations)"][metric] > comparison["EK-FAC multi-stage"][metric] + 0.2
