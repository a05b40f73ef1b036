"""EK-FAC factors and their inverses against hand-computed statistics and dense matrices."""

import pytest
import torch

from dense import damped, dense_curvature, dense_eigenbasis_matrix, flatten, predicted_tokens_per_document, unflatten
from pretrace.curvature import EKFAC, KFAC, Diagonal, FitSettings, fit_factors
from pretrace.data import Document
from pretrace.data.batching import collate, encode_documents, iter_batches
from pretrace.gradients import LanguageModelingTask
from pretrace.modeling.modules import select_modules
from tiny import build_tiny_model


def _docs(sentences):
    return [Document(str(i), s) for i, s in enumerate(sentences)]


def _source(tokenizer, docs, batch_size=3, padding_side="right"):
    return lambda: iter_batches(encode_documents(tokenizer, docs, 64), batch_size, tokenizer.pad_token_id, padding_side)


def _hand_statistics(model, module, tokenizer, docs):
    """A, G over predicting positions and per-document gradients, one document at a time with plain hooks."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(a=args[0], y=out) or out.retain_grad())
    A = G = 0
    tokens, grads = 0, []
    for enc in encode_documents(tokenizer, docs, 64):
        batch = collate([enc], 0)
        model.zero_grad(set_to_none=True)
        LanguageModelingTask().document_loss(model, batch).sum().backward()
        a = torch.cat([seen["a"][0], torch.ones(seen["a"].shape[1], 1, dtype=seen["a"].dtype)], 1)[:-1]
        g = seen["y"].grad[0][:-1]
        A, G, tokens = A + a.T @ a, G + g.T @ g, tokens + a.shape[0]
        grads.append(torch.cat([module.weight.grad, module.bias.grad[:, None]], 1).clone())
    handle.remove()
    return A / tokens, G / tokens, torch.stack(grads)


def test_empirical_factors_equal_hand_computed(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model)
    docs = _docs(sentences)
    factors = fit_factors(model, tracked, _source(tokenizer, docs), FitSettings(fisher="empirical", factor_dtype="float64"), progress=False)
    for t in tracked:
        A, G, grads = _hand_statistics(model, t.module, tokenizer, docs)
        mf = factors.modules[t.name]
        torch.testing.assert_close(mf.activation_covariance, A)
        torch.testing.assert_close(mf.gradient_covariance[0], G)
        qa, qg = mf.activation_eigenvectors, mf.gradient_eigenvectors[0]
        torch.testing.assert_close(qa @ torch.diag(mf.activation_eigenvalues) @ qa.T, A)
        lam = (qg.T @ grads @ qa).square().mean(0)
        torch.testing.assert_close(mf.lambda_[0], lam)
    assert factors.metadata["documents"] == len(docs)


@pytest.mark.parametrize("blocks", ["layer", "head"])
@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
def test_inverse_hvp_equals_dense_solve(kind, blocks, tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, attention_blocks=blocks)
    factors = fit_factors(model, tracked, _source(tokenizer, _docs(sentences)), FitSettings(factor_dtype="float64", diagonal=True), progress=False)
    op = {"ekfac": EKFAC, "kfac": KFAC, "diagonal": Diagonal}[kind](factors, damping_factor=0.1)
    vectors = torch.randn(3, sum(t.num_parameters for t in tracked), dtype=torch.float64)
    ours = flatten(op.apply(unflatten(vectors, tracked)), tracked)
    # the dense matrices and their 0.1 × mean-eigenvalue damping from the stored factors, not from the operator;
    # K-FAC's tokens per document counted from the tokenizer
    blocks, dampings = dense_curvature(kind, factors, model, tracked, predicted_tokens_per_document(tokenizer, sentences))
    reference = torch.linalg.solve(damped(blocks, dampings), vectors.T).T
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-12)  # float64 factors: a dense solve agrees to ~1e-13


def test_kfac_dense_is_scaled_kronecker_of_covariances(tokenizer, sentences):
    model = build_tiny_model("gpt2", tokenizer)
    tracked = select_modules(model, preset="mlp")
    factors = fit_factors(model, tracked, _source(tokenizer, _docs(sentences)), FitSettings(factor_dtype="float64"), progress=False)
    t = tracked[0]
    mf = factors.modules[t.name]
    op = KFAC(factors, damping=0.0)
    qa, qg = mf.activation_eigenvectors, mf.gradient_eigenvectors
    dense = dense_eigenbasis_matrix(qa, qg, op.eigenvalues(t.name), 0.0)
    expected = predicted_tokens_per_document(tokenizer, sentences) * torch.kron(mf.gradient_covariance[0], mf.activation_covariance)
    torch.testing.assert_close(dense, expected, rtol=1e-7, atol=1e-10)


def test_damping_never_modifies_lambda(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, preset="mlp")
    factors = fit_factors(model, tracked, _source(tokenizer, _docs(sentences)), FitSettings(factor_dtype="float64"), progress=False)
    before = {n: mf.lambda_.clone() for n, mf in factors.modules.items()}
    grads = {t.name: torch.randn(2, t.d_out, t.d_in_total, dtype=torch.float64) for t in tracked}
    op = EKFAC(factors, damping=0.5)
    first = op.apply(grads)
    second = EKFAC(factors, damping=0.5).apply(grads)
    third = op.apply(grads)
    for n in before:
        assert torch.equal(factors.modules[n].lambda_, before[n])
        torch.testing.assert_close(first[n], second[n], rtol=0, atol=0)
        torch.testing.assert_close(first[n], third[n], rtol=0, atol=0)


def test_true_fisher_is_seeded_and_differs_from_empirical(tokenizer, sentences):
    model = build_tiny_model("llama", tokenizer)
    tracked = select_modules(model, preset="mlp")
    fit = lambda **kw: fit_factors(model, tracked, _source(tokenizer, _docs(sentences)), FitSettings(**kw), progress=False)
    a, b, c, emp = fit(seed=1), fit(seed=1), fit(seed=2), fit(fisher="empirical")
    name = tracked[0].name
    assert torch.equal(a.modules[name].lambda_, b.modules[name].lambda_)
    assert not torch.equal(a.modules[name].lambda_, c.modules[name].lambda_)
    assert not torch.allclose(a.modules[name].gradient_covariance, emp.modules[name].gradient_covariance)


def test_interrupted_fit_resumes_to_identical_factors(tmp_path, tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model)
    docs = _docs(sentences)
    settings = FitSettings(checkpoint_every=1, factor_dtype="float64")
    reference = fit_factors(model, tracked, _source(tokenizer, docs, batch_size=2), settings, progress=False)

    calls = {"n": 0}

    def failing():
        for batch in _source(tokenizer, docs, batch_size=2)():
            calls["n"] += 1
            if calls["n"] == 7:  # inside the second pass
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, tracked, failing, settings, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert (tmp_path / "ckpt" / "lambda.safetensors").exists()
    resumed = fit_factors(model, tracked, _source(tokenizer, docs, batch_size=2), settings, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for name, mf in reference.modules.items():
        torch.testing.assert_close(resumed.modules[name].lambda_, mf.lambda_, rtol=0, atol=0)
        torch.testing.assert_close(resumed.modules[name].activation_covariance, mf.activation_covariance, rtol=0, atol=0)


def test_factors_round_trip_and_refuse_mismatch(tmp_path, tokenizer, sentences):
    from pretrace.curvature import Factors
    from pretrace.errors import PretraceError

    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, attention_blocks="head")
    factors = fit_factors(model, tracked, _source(tokenizer, _docs(sentences)), FitSettings(), progress=False)
    factors.save(tmp_path / "f")
    loaded = Factors.load(tmp_path / "f")
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "f" / "factors.safetensors"))
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    assert raw[f"{qkv}.lambda"].shape == (6, 8, 17)
    assert raw[f"{qkv}.gradient_covariance"].shape == (6, 8, 8)
    assert raw["gpt_neox.layers.0.mlp.dense_h_to_4h.lambda"].shape == (32, 17)
    for name, mf in factors.modules.items():
        assert torch.equal(loaded.modules[name].lambda_, mf.lambda_)
    loaded.check_matches(tracked)
    with pytest.raises(PretraceError, match="shape"):
        loaded.check_matches(select_modules(model, attention_blocks="layer"))


def test_sampled_labels_follow_the_model_distribution():
    from pretrace.gradients.task import sample_labels

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(100_000, 1)
    drawn = sample_labels(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4) / len(drawn)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=5e-3, rtol=0)


@pytest.mark.parametrize("keep_bytes", [1 << 30, 60_000])  # every batch kept; the budget runs out on the way
def test_kept_captures_give_the_factors_of_a_second_pass_over_the_model(tokenizer, sentences, keep_bytes):
    """With the empirical Fisher the eigenvalue correction reads the covariance pass's captures when they fit in
    `keep_bytes` (one pass over the batches instead of two), and the factors equal those of two passes bit for bit;
    over the budget, or with sampled labels, it makes its second pass."""
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model)
    docs = _docs(sentences)
    passes = {"n": 0}

    def counted():
        passes["n"] += 1
        return _source(tokenizer, docs)()

    def fit(keep, fisher="empirical"):
        passes["n"] = 0
        factors = fit_factors(model, tracked, counted, FitSettings(fisher=fisher, factor_dtype="float64"), progress=False, keep_bytes=keep)
        return factors, passes["n"]

    (two, two_passes), (one, one_pass) = fit(0), fit(keep_bytes)
    assert two_passes == 2 and one_pass == (1 if keep_bytes > 1 << 20 else 2)
    for name, mf in two.modules.items():
        for field in ("activation_covariance", "gradient_covariance", "activation_eigenvectors", "gradient_eigenvectors", "lambda_"):
            assert torch.equal(getattr(one.modules[name], field), getattr(mf, field)), (name, field)
    assert fit(keep_bytes, fisher="true")[1] == 2
