"""The linear datamodeling score: a hand-computed example, exact influence on ridge regression, and caching."""

import pytest
import torch

from pretrace.bench.lds import linear_datamodeling_scores, measure_subsets, predicted_effects, subset_masks
from pretrace.errors import PretraceError


def test_lds_of_a_hand_computed_example():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 0.0, 1.0, 0.0]])
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert predicted_effects(scores, masks).tolist() == [[3.0, 4.0], [7.0, 1.0], [4.0, 5.0]]
    losses = torch.tensor([[0.5, 0.2], [0.1, 0.9], [0.3, 0.4]])
    # query 0: predicted 3, 7, 4 and loss decreases -0.5, -0.1, -0.3 rank alike -> 1
    # query 1: predicted ranks 2, 1, 3 against -loss ranks 3, 1, 2 -> centred (0,-1,1)·(1,-1,0) / 2 = 0.5
    assert linear_datamodeling_scores(scores, masks, losses) == pytest.approx([1.0, 0.5], abs=1e-12)


def test_subsets_are_seeded_halves():
    masks = subset_masks(10, 6, seed=3)
    assert masks.shape == (6, 10) and masks.sum(1).tolist() == [5] * 6
    assert torch.equal(masks, subset_masks(10, 6, seed=3)) and not torch.equal(masks, subset_masks(10, 6, seed=4))
    assert len({tuple(row.tolist()) for row in masks}) > 1
    with pytest.raises(PretraceError, match="whole pool"):
        predicted_effects(torch.zeros(2, 9), masks)


def _ridge(x, y, weights, damping):
    """argmin Σ_i w_i ½(x_iᵀθ − y_i)² + damping/2 ‖θ‖², in closed form."""
    hessian = x.T @ (weights[:, None] * x) + damping * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(hessian, x.T @ (weights * y)), hessian


def test_exact_influence_has_a_high_lds_on_ridge_regression_and_noise_does_not(tmp_path):
    generator = torch.Generator().manual_seed(0)
    n, d, damping = 60, 4, 5.0
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(d, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    xq = torch.randn(3, d, generator=generator, dtype=torch.float64)
    yq = torch.randn(3, generator=generator, dtype=torch.float64)
    query_loss = lambda theta: 0.5 * (xq @ theta - yq) ** 2

    theta, hessian = _ridge(x, y, torch.ones(n, dtype=torch.float64), damping)
    query_grads = (xq @ theta - yq)[:, None] * xq  # ∇m_q
    document_grads = (x @ theta - y)[:, None] * x  # ∇ℓ_i
    influence = query_grads @ torch.linalg.solve(hessian, document_grads.T)  # [Q, N]: positive lowers the query loss

    masks = subset_masks(n, 50, seed=0)
    losses = measure_subsets(tmp_path, masks, lambda members: query_loss(_ridge(x, y, masks.new_zeros(n, dtype=torch.float64).index_fill(0, torch.tensor(members), 1.0), damping)[0]))
    exact = linear_datamodeling_scores(influence, masks, losses)
    assert min(exact) > 0.9
    assert max(linear_datamodeling_scores(-influence, masks, losses)) < -0.9  # the sign convention matters
    noise = linear_datamodeling_scores(torch.randn(3, n, generator=generator, dtype=torch.float64), masks, losses)
    assert max(abs(v) for v in noise) < 0.5


def test_retrained_subsets_are_cached_and_a_foreign_cache_is_refused(tmp_path, capsys):
    masks = subset_masks(8, 3, seed=0)
    calls = []
    retrain = lambda members: calls.append(members) or [float(sum(members)), 1.0]
    with pytest.warns(UserWarning, match="fewer than 50"):
        first = measure_subsets(tmp_path, masks, retrain, identity={"seed": 0})
    assert "WARNING" in capsys.readouterr().out
    assert first.shape == (3, 2) and len(calls) == 3
    with pytest.warns(UserWarning):
        again = measure_subsets(tmp_path, masks, retrain, identity={"seed": 0})
    assert torch.equal(first, again) and len(calls) == 3  # nothing retrained
    with pytest.warns(UserWarning), pytest.raises(PretraceError, match="another run"):
        measure_subsets(tmp_path, masks, retrain, identity={"seed": 1})
