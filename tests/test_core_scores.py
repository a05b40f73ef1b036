"""Pairwise scores against dense references and their invariances."""

import random

import pytest
import torch

from dense import autograd_document_gradients, damped, dense_curvature, dense_gauss_newton, flatten
from pretrace.curvature import EKFAC, FitSettings, Identity, fit_factors
from pretrace.data import Document, Query
from pretrace.data.batching import encode_documents, encode_queries, iter_batches
from pretrace.metrics import spearman
from pretrace.modeling.modules import select_modules
from pretrace.scores import query_gradients, score_documents, self_influence
from tiny import WORDS, build_tiny_model

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat ."), Query("q2", "birds can fly and", " fish can swim .")]


def _random_docs(n, seed=0):
    rng = random.Random(seed)
    return [Document(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))) for i in range(n)]


def _batches(tokenizer, docs, batch_size=4, padding_side="right"):
    return iter_batches(encode_documents(tokenizer, docs, 64), batch_size, tokenizer.pad_token_id, padding_side)


def _query_grads(model, tracked, tokenizer, batch_size=3):
    return query_gradients(model, tracked, iter_batches(encode_queries(tokenizer, QUERIES, 64), batch_size, tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, attention_blocks="head")
    docs = [Document(str(i), s) for i, s in enumerate(sentences)] + _random_docs(12)
    factors = fit_factors(model, tracked, lambda: _batches(tokenizer, docs), FitSettings(factor_dtype="float64"), progress=False)
    return model, tracked, docs, factors


def test_scores_equal_dense_formula(setup, tokenizer):
    model, tracked, docs, factors = setup
    op = EKFAC(factors)
    ids, grads = _query_grads(model, tracked, tokenizer)
    result = score_documents(model, tracked, op.apply(grads), _batches(tokenizer, docs), ids)
    dense = damped(*dense_curvature("ekfac", factors, model, tracked, tokens_per_document=None))  # damping 0.1 × mean Λ, from the matrix
    doc_grads = autograd_document_gradients(model, tracked, tokenizer, docs)
    reference = flatten(grads, tracked) @ torch.linalg.solve(dense, doc_grads.T)
    torch.testing.assert_close(result.scores, reference, rtol=1e-7, atol=1e-9)
    assert result.query_ids == ["q0", "q1", "q2"] and result.document_ids == [d.id for d in docs]


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (5, "left"), (7, "right")])
def test_scores_do_not_depend_on_batch_size_or_padding(setup, tokenizer, batch_size, padding_side):
    model, tracked, docs, factors = setup
    ids, grads = _query_grads(model, tracked, tokenizer)
    pre = EKFAC(factors).apply(grads)
    base = score_documents(model, tracked, pre, _batches(tokenizer, docs, 4), ids).scores
    other = score_documents(model, tracked, pre, _batches(tokenizer, docs, batch_size, padding_side), ids).scores
    ids1, grads1 = _query_grads(model, tracked, tokenizer, batch_size=1)
    torch.testing.assert_close(other, base, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score_documents(model, tracked, EKFAC(factors).apply(grads1), _batches(tokenizer, docs), ids1).scores, base, rtol=1e-9, atol=1e-9)


def test_per_module_and_per_token_sum_to_scores(setup, tokenizer):
    model, tracked, docs, factors = setup
    ids, grads = _query_grads(model, tracked, tokenizer)
    result = score_documents(model, tracked, EKFAC(factors).apply(grads), _batches(tokenizer, docs, 5, "left"), ids, per_module=True, per_token=True)
    torch.testing.assert_close(result.per_module.sum(0), result.scores, rtol=1e-10, atol=1e-10)
    assert result.per_module.shape == (len(tracked), 3, len(docs))
    token_totals = torch.stack([t.sum(-1) for t in result.per_token], dim=1)
    torch.testing.assert_close(token_totals, result.scores, rtol=1e-10, atol=1e-10)
    for doc, token_ids, contributions in zip(docs, result.document_token_ids, result.per_token):
        assert token_ids == tokenizer(doc.text)["input_ids"]
        assert contributions.shape == (3, len(token_ids))


def test_identity_is_gradient_dot_product_and_self_influence(setup, tokenizer):
    model, tracked, docs, factors = setup
    ids, grads = _query_grads(model, tracked, tokenizer)
    doc_grads = autograd_document_gradients(model, tracked, tokenizer, docs)
    dot = score_documents(model, tracked, Identity().apply(grads), _batches(tokenizer, docs), ids).scores
    torch.testing.assert_close(dot, flatten(grads, tracked) @ doc_grads.T)
    _, values = self_influence(model, tracked, Identity(), _batches(tokenizer, docs))
    torch.testing.assert_close(values, (doc_grads**2).sum(1))


def _exact_comparison(tokenizer, sentences, preset, block_diagonal, attention_blocks="layer"):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, preset=preset, attention_blocks=attention_blocks)
    assert attention_blocks == "layer" or any(t.n_blocks > 1 for t in tracked)
    docs = [Document(str(i), s) for i, s in enumerate(sentences)] + _random_docs(24, seed=3)
    repeated = docs * 16  # 16 label samples per document: the sampled Fisher approaches its expectation
    factors = fit_factors(model, tracked, lambda: _batches(tokenizer, repeated, 16), FitSettings(factor_dtype="float64"), progress=False)
    damping = 0.1 * sum(factors.mean_lambda(t.name) for t in tracked) / len(tracked)
    ids, grads = _query_grads(model, tracked, tokenizer)
    ekfac = score_documents(model, tracked, EKFAC(factors, damping=damping).apply(grads), _batches(tokenizer, docs), ids).scores
    gn = dense_gauss_newton(model, tracked, tokenizer, docs)
    if block_diagonal:  # what any per-module method approximates: no cross-module curvature
        keep = torch.block_diag(*[torch.ones(t.num_parameters, t.num_parameters, dtype=gn.dtype) for t in tracked])
        gn = gn * keep
    doc_grads = autograd_document_gradients(model, tracked, tokenizer, docs)
    exact = flatten(grads, tracked) @ torch.linalg.solve(gn + damping * torch.eye(len(gn), dtype=gn.dtype), doc_grads.T)
    dot = flatten(grads, tracked) @ doc_grads.T
    ours = [spearman(ekfac[q], exact[q]) for q in range(len(ids))]
    baseline = [spearman(dot[q], exact[q]) for q in range(len(ids))]
    return ours, baseline


def test_ekfac_ranks_like_exact_gauss_newton_influence(tokenizer, sentences):
    """True-Fisher EK-FAC vs the exact damped Gauss-Newton inverse built densely (MLP modules, 2,144 parameters)."""
    ours, baseline = _exact_comparison(tokenizer, sentences, "mlp", block_diagonal=False)
    assert min(ours) >= 0.9, ours
    assert sum(ours) > sum(baseline) + 1.0, (ours, baseline)


def test_ekfac_ranks_like_module_wise_exact_gauss_newton(tokenizer, sentences):
    """All modules with per-head blocks: against the exact per-module (block-diagonal) Gauss-Newton inverse."""
    ours, baseline = _exact_comparison(tokenizer, sentences, "all", block_diagonal=True, attention_blocks="head")
    assert min(ours) >= 0.95, ours
    assert sum(ours) > sum(baseline) + 1.0, (ours, baseline)


def _second_factors(model, tracked, tokenizer):
    """Factors of other documents: a second curvature with its own eigenbases, as fine-tuning gives."""
    other = _random_docs(16, seed=5)
    return fit_factors(model, tracked, lambda: _batches(tokenizer, other), FitSettings(factor_dtype="float64"), progress=False)


def test_multi_stage_queries_take_the_eigenbasis_route_and_equal_the_dense_chain(setup, tokenizer):
    """α (H_ft + αI)⁻¹ then H_pt⁻¹, formed from token factors and left in H_pt's eigenbasis, equals the chain applied densely."""
    from pretrace.curvature import Chain, Scaled
    from pretrace.scores.queries import precondition_queries

    model, tracked, docs, factors = setup
    chain = Scaled(Chain([EKFAC(_second_factors(model, tracked, tokenizer), damping=0.05), EKFAC(factors)]), 0.05)
    assert chain.kronecker_eigenbasis and not chain.is_identity
    batches = lambda: iter_batches(encode_queries(tokenizer, QUERIES, 64), 2, tokenizer.pad_token_id)  # noqa: E731
    prepared = precondition_queries(model, tracked, batches(), chain)
    ids, grads = query_gradients(model, tracked, batches())
    dense = chain.apply(grads)
    assert prepared.route == "eigenbasis" and prepared.ids == ids
    for name, weights in prepared.weights.items():
        torch.testing.assert_close(weights.dense(), dense[name], rtol=1e-9, atol=1e-12 * float(dense[name].abs().max()))
    scored = score_documents(model, tracked, prepared.weights, _batches(tokenizer, docs), ids).scores
    reference = score_documents(model, tracked, dense, _batches(tokenizer, docs), ids).scores
    torch.testing.assert_close(scored, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))


def test_identity_queries_are_their_exact_token_factors(setup, tokenizer):
    from pretrace.scores.queries import precondition_queries
    from pretrace.scores.weights import LowRankWeights

    model, tracked, docs, _ = setup
    batches = lambda: iter_batches(encode_queries(tokenizer, QUERIES, 64), 2, tokenizer.pad_token_id)  # noqa: E731
    prepared = precondition_queries(model, tracked, batches(), Identity(), query_rank=1)
    ids, grads = query_gradients(model, tracked, batches())
    assert prepared.route == "tokens" and prepared.relative_error is None  # nothing approximated, whatever query_rank says
    assert any(isinstance(w, LowRankWeights) for w in prepared.weights.values())  # narrow modules may stay dense
    for name, weights in prepared.weights.items():
        torch.testing.assert_close(weights.dense(), grads[name], rtol=1e-12, atol=1e-14 * float(grads[name].abs().max()))


def test_several_weight_sets_in_one_pass_equal_one_pass_each(setup, tokenizer, tmp_path):
    from pretrace.scores import ScoringPlan, score_weight_sets

    model, tracked, docs, factors = setup
    ids, grads = _query_grads(model, tracked, tokenizer)
    sets = {"ekfac@0.1": (ids, EKFAC(factors).apply(grads)), "dot@0.01": (ids[:2], {n: g[:2] for n, g in grads.items()})}
    together = score_weight_sets(model, tracked, sets, _batches(tokenizer, docs), per_module=True, per_token=True)
    spilled = score_weight_sets(model, tracked, sets, _batches(tokenizer, docs), per_module=True, plan=ScoringPlan(spill_folder=tmp_path))
    assert together.keys() == sets.keys() == spilled.keys()
    assert len(list(tmp_path.glob("*.npy"))) == 2 * len(sets)  # one file per set and kind: none overwrites another
    for label, (query_ids, weights) in sets.items():
        alone = score_documents(model, tracked, weights, _batches(tokenizer, docs), query_ids, per_module=True, per_token=True)
        mine = together[label]
        assert mine.query_ids == alone.query_ids and mine.document_ids == alone.document_ids
        assert torch.equal(mine.scores, alone.scores) and torch.equal(mine.per_module, alone.per_module)
        assert all(torch.equal(a, b) for a, b in zip(mine.per_token, alone.per_token))
        torch.testing.assert_close(spilled[label].scores.double(), alone.scores, rtol=1e-6, atol=1e-6 * float(alone.scores.abs().max()))  # float32 on disk
        torch.testing.assert_close(spilled[label].per_module.double(), alone.per_module, rtol=1e-6, atol=1e-6 * float(alone.per_module.abs().max()))


def test_self_influence_on_every_route_equals_the_dense_formula(setup, tokenizer):
    """Eigenbasis (EK-FAC), exact token factors (identity) and dense (a scaled identity) routes: diag(D P Dᵀ)."""
    from pretrace.curvature import Scaled

    model, tracked, docs, factors = setup
    doc_grads = autograd_document_gradients(model, tracked, tokenizer, docs)
    dense = damped(*dense_curvature("ekfac", factors, model, tracked, tokens_per_document=None))
    cases = {"ekfac": (EKFAC(factors), torch.linalg.solve(dense, doc_grads.T).T), "identity": (Identity(), doc_grads),
             "scaled identity": (Scaled(Identity(), 0.5), 0.5 * doc_grads)}
    for name, (preconditioner, preconditioned) in cases.items():
        ids, values = self_influence(model, tracked, preconditioner, _batches(tokenizer, docs, 5))
        reference = (preconditioned * doc_grads).sum(1)
        assert ids == [d.id for d in docs]
        torch.testing.assert_close(values, reference, rtol=1e-7, atol=1e-9 * float(reference.abs().max()), msg=name)
