"""The fast scoring path (queries preconditioned from token factors, eigenbasis or low-rank weights)
against dense matrices built independently."""

import random

import pytest
import torch

from dense import autograd_document_gradients, damped, dense_curvature, flatten, hand_query_gradients, predicted_tokens_per_document
from pretrace.curvature import EKFAC, KFAC, FitSettings, Identity, fit_factors
from pretrace.curvature.operators import from_eigenbasis
from pretrace.data import Document, Query
from pretrace.data.batching import encode_documents, encode_queries, iter_batches
from pretrace.errors import PretraceError
from pretrace.modeling.modules import select_modules
from pretrace.scores import query_gradients, score_documents
from pretrace.scores.queries import precondition_queries
from pretrace.scores.weights import EigenbasisWeights, LowRankWeights
from tiny import WORDS, build_tiny_model

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat ."), Query("q2", "birds can fly and", " fish can swim .")]


def _docs(n, seed=0):
    rng = random.Random(seed)
    return [Document(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))) for i in range(n)]


def _batches(tokenizer, docs, batch_size=4):
    return iter_batches(encode_documents(tokenizer, docs, 64), batch_size, tokenizer.pad_token_id)


def _query_batches(tokenizer):
    return iter_batches(encode_queries(tokenizer, QUERIES, 64), 2, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, attention_blocks="head")  # blocked Q_G on the fused QKV projections
    docs = [Document(str(i), s) for i, s in enumerate(sentences)] + _docs(10)
    factors = fit_factors(model, tracked, lambda: _batches(tokenizer, docs), FitSettings(factor_dtype="float64"), progress=False)
    return model, tracked, docs, factors


def _dense_reference(model, tracked, tokenizer, docs, factors, op):
    """[Q, N]: hand-written query gradients · (dense EK-FAC or K-FAC + 0.1 × mean eigenvalue)⁻¹ · document gradients,
    the matrix and its damping built from the stored factors (never from the operator under test)."""
    kind = "kfac" if isinstance(op, KFAC) else "ekfac"
    blocks, dampings = dense_curvature(kind, factors, model, tracked, predicted_tokens_per_document(tokenizer, docs))
    q = hand_query_gradients(model, tracked, tokenizer, [(x.prompt, x.completion) for x in QUERIES])
    return q @ torch.linalg.solve(damped(blocks, dampings), autograd_document_gradients(model, tracked, tokenizer, docs).T)


@pytest.mark.parametrize("kind", [EKFAC, KFAC])
@pytest.mark.parametrize("document_tokens", [None, 1])  # None: queries rotated back; 1: documents rotated into the eigenbasis
def test_fast_path_equals_dense_formula(setup, tokenizer, kind, document_tokens):
    model, tracked, docs, factors = setup
    op = kind(factors, damping_factor=0.1)
    queries = precondition_queries(model, tracked, _query_batches(tokenizer), op)
    weights = {name: w.settle(document_tokens) for name, w in queries.weights.items()}
    assert all(isinstance(w, EigenbasisWeights) == (document_tokens == 1) for w in weights.values())
    result = score_documents(model, tracked, weights, _batches(tokenizer, docs), queries.ids)
    torch.testing.assert_close(result.scores, _dense_reference(model, tracked, tokenizer, docs, factors, op), rtol=1e-7, atol=1e-9)
    assert queries.ids == ["q0", "q1", "q2"] and queries.low_rank_error is None


def test_settling_in_the_stream_picks_the_cheaper_basis(setup, tokenizer):
    model, tracked, docs, factors = setup
    queries = precondition_queries(model, tracked, _query_batches(tokenizer), EKFAC(factors))
    qkv = next(t.name for t in tracked if t.name.endswith("query_key_value"))
    weight = queries.weights[qkv]
    few = score_documents(model, tracked, queries.weights, _batches(tokenizer, docs[:2]), queries.ids, num_batches=1)
    many = score_documents(model, tracked, queries.weights, _batches(tokenizer, docs[:2]), queries.ids, num_batches=10**6)
    torch.testing.assert_close(few.scores, many.scores, rtol=1e-9, atol=1e-12)
    assert not isinstance(queries.weights[qkv], EigenbasisWeights)  # settled in place for the long stream
    assert isinstance(weight.settle(1), EigenbasisWeights) and not isinstance(weight.settle(10**9), EigenbasisWeights)


def test_per_token_and_per_module_in_the_eigenbasis_sum_to_scores(setup, tokenizer):
    model, tracked, docs, factors = setup
    op = EKFAC(factors)
    queries = precondition_queries(model, tracked, _query_batches(tokenizer), op)
    eigen = {name: w.settle(1) for name, w in queries.weights.items()}
    detail = score_documents(model, tracked, eigen, _batches(tokenizer, docs[:5]), queries.ids, per_module=True, per_token=True)
    _, grads = query_gradients(model, tracked, _query_batches(tokenizer))
    plain = score_documents(model, tracked, op.apply(grads), _batches(tokenizer, docs[:5]), queries.ids, per_token=True)
    torch.testing.assert_close(detail.per_module.sum(0), detail.scores, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(detail.per_token, plain.per_token):  # each token's contribution is basis-independent
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)


def test_factored_preconditioning_equals_dense_apply(setup):
    _, tracked, _, factors = setup
    op = EKFAC(factors)
    generator = torch.Generator().manual_seed(0)
    for t in tracked:
        for tokens in (2, 400):  # short sequences rotate token factors, long ones the dense gradient
            g = torch.randn(3, tokens, t.d_out, generator=generator, dtype=torch.float64)
            a = torch.randn(3, tokens, t.d_in_total, generator=generator, dtype=torch.float64)
            qa, qg = op.eigenbasis(t.name, a.device, a.dtype)
            ours = from_eigenbasis(op.apply_factored_in_eigenbasis(t.name, g, a), qa, qg)
            torch.testing.assert_close(ours, op.apply_module(t.name, torch.einsum("qto,qti->qoi", g, a)), rtol=1e-9, atol=1e-9)


def test_other_preconditioners_take_the_dense_route(setup, tokenizer):
    model, tracked, docs, _ = setup
    queries = precondition_queries(model, tracked, _query_batches(tokenizer), Identity())
    result = score_documents(model, tracked, queries.weights, _batches(tokenizer, docs[:4]), queries.ids)
    _, grads = query_gradients(model, tracked, _query_batches(tokenizer))
    reference = flatten(grads, tracked) @ autograd_document_gradients(model, tracked, tokenizer, docs[:4]).T
    torch.testing.assert_close(result.scores, reference, rtol=1e-7, atol=1e-10)


def _truncated_reference(dense: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart–Young, computed another way: project each matrix on its top eigenvectors of W Wᵀ."""
    out = []
    for w in dense:
        _, vectors = torch.linalg.eigh(w @ w.T)
        top = vectors[:, -rank:]
        out.append(top @ top.T @ w)
    return torch.stack(out)


@pytest.mark.parametrize("document_tokens", [None, 1])
def test_low_rank_queries_score_the_truncated_gradients(setup, tokenizer, document_tokens):
    model, tracked, docs, factors = setup
    op, rank = EKFAC(factors), 2
    full = precondition_queries(model, tracked, _query_batches(tokenizer), op)
    low = precondition_queries(model, tracked, _query_batches(tokenizer), op, query_rank=rank)
    dense = {name: w.dense() for name, w in full.weights.items()}
    truncated = {name: w.dense() for name, w in low.weights.items()}
    for name in dense:
        assert torch.linalg.matrix_rank(truncated[name]).max() <= rank
        reported = (dense[name] - truncated[name]).flatten(1).norm(dim=1) / dense[name].flatten(1).norm(dim=1)
        optimal = (dense[name] - _truncated_reference(dense[name], rank)).flatten(1).norm(dim=1) / dense[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(low.low_rank_error[name], reported, rtol=1e-6, atol=1e-9)
        assert (reported >= optimal - 1e-9).all() and (reported <= optimal * 1.02 + 1e-9).all()  # randomized SVD: near Eckart–Young
    overall = (flatten(dense, tracked) - flatten(truncated, tracked)).norm(dim=1) / flatten(dense, tracked).norm(dim=1)
    torch.testing.assert_close(low.relative_error, overall, rtol=1e-6, atol=1e-9)
    assert (low.relative_error > 0).all() and (low.relative_error < 1).all()
    weights = {name: w.settle(document_tokens) for name, w in low.weights.items()}
    result = score_documents(model, tracked, weights, _batches(tokenizer, docs), low.ids, per_token=True)
    reference = flatten(truncated, tracked) @ autograd_document_gradients(model, tracked, tokenizer, docs).T
    torch.testing.assert_close(result.scores, reference, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.stack([c.sum(1) for c in result.per_token], 1), result.scores, rtol=1e-9, atol=1e-12)


def test_full_rank_is_exact(setup, tokenizer):
    model, tracked, docs, factors = setup
    op = EKFAC(factors)
    full_rank = max(min(t.d_out, t.d_in_total) for t in tracked)
    low = precondition_queries(model, tracked, _query_batches(tokenizer), op, query_rank=full_rank)
    full = precondition_queries(model, tracked, _query_batches(tokenizer), op)
    assert float(low.relative_error.max()) < 1e-7
    ours = score_documents(model, tracked, low.weights, _batches(tokenizer, docs[:4]), low.ids).scores
    torch.testing.assert_close(ours, score_documents(model, tracked, full.weights, _batches(tokenizer, docs[:4]), full.ids).scores, rtol=1e-7, atol=1e-10)


def test_low_rank_factors_rotate_back_exactly(setup):
    _, tracked, _, factors = setup
    op = EKFAC(factors)
    t = tracked[0]
    qa, qg = op.eigenbasis(t.name, torch.device("cpu"), torch.float64)
    generator = torch.Generator().manual_seed(1)
    low = LowRankWeights(torch.randn(2, t.d_out, 3, generator=generator, dtype=torch.float64), torch.randn(2, t.d_in_total, 3, generator=generator, dtype=torch.float64))
    torch.testing.assert_close(low.rotated_back(qa, qg).dense(), from_eigenbasis(low.dense(), qa, qg), rtol=1e-10, atol=1e-10)


def test_bad_query_rank_is_refused(setup, tokenizer):
    model, tracked, _, factors = setup
    with pytest.raises(PretraceError, match="query-rank"):
        precondition_queries(model, tracked, _query_batches(tokenizer), EKFAC(factors), query_rank=0)
