"""Per-head EK-FAC, K-FAC, the diagonal and relative damping against statistics computed from scratch.

The reference (tests/dense.py: `hand_statistics`) tokenizes with the tokenizer itself, runs each document
alone, writes the shifted next-token cross-entropy by hand and slices heads from each architecture's own
layout. pretrace fits on padded batches of three, so an error in its masks, bias column, head slicing or
statistics shows up as a mismatch instead of cancelling.
"""

import pytest
import torch

import pretrace.gradients.task as task_module
from dense import computation_dtype, hand_statistics, head_rows, token_ids, tolerance
from pretrace.curvature import EKFAC, KFAC, Diagonal, FitSettings, fit_factors
from pretrace.data import Document
from pretrace.data.batching import encode_documents, iter_batches
from pretrace.modeling.modules import select_modules
from tiny import build_tiny_model

ARCHS = ["gpt_neox", "llama", "gpt2", "bloom"]


def _fit(model, tracked, tokenizer, sentences, fisher, padding_side="right"):
    docs = [Document(str(i), s) for i, s in enumerate(sentences)]
    source = lambda: iter_batches(encode_documents(tokenizer, docs, 64), 3, tokenizer.pad_token_id, padding_side)
    return fit_factors(model, tracked, source, FitSettings(fisher=fisher, factor_dtype="float64", diagonal=True), progress=False)


def _tolerance(model, tokenizer, sentences, reference):
    """float64 where the model really differentiates in float64 (GPT-NeoX, GPT-2); float32 where a step runs
    in float32 (Llama's RMSNorm, BLOOM's softmax), since pretrace's padded batches round differently."""
    ids = token_ids(tokenizer, sentences[0])
    return tolerance(computation_dtype(model, lambda: model(input_ids=ids[None]).logits.sum()), reference)


def _dense_indices(model, t):
    """Per block, its positions in the row-major vec of the [d_out, d_in'] gradient; the blocks must partition it."""
    rows = [head_rows(model, b, t.d_out) for b in t.block_names]
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(t.d_out))
    return [(r[:, None] * t.d_in_total + torch.arange(t.d_in_total)[None]).flatten() for r in rows]


def _check_eigenbasis(q, matrix, values, tol):
    """q is orthonormal and diagonalises the reference matrix, with eigenvalues computed by torch from it."""
    torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype), rtol=0, atol=1e-10)  # float64 eigh: orthonormal to ~1e-15
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrix), **tol)
    torch.testing.assert_close(q.T @ matrix @ q, torch.diag(values), **tol)


def _check_against_reference(model, tracked, factors, stats, tokens, n_docs, tol):
    vectors = {t.name: torch.randn(2, t.d_out, t.d_in_total, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) for t in tracked}
    ekfac, kfac, diag = EKFAC(factors), KFAC(factors), Diagonal(factors)
    ours = {"ekfac": ekfac.apply(vectors), "kfac": kfac.apply(vectors), "diagonal": diag.apply(vectors)}
    assert factors.metadata["tokens"] == tokens and factors.metadata["documents"] == n_docs
    for t in tracked:
        mf, s = factors.modules[t.name], stats[t.name]
        torch.testing.assert_close(mf.activation_covariance, s["A"], **tol(s["A"]))
        torch.testing.assert_close(mf.gradient_covariance, s["G"], **tol(s["G"]))
        _check_eigenbasis(mf.activation_eigenvectors, s["A"], mf.activation_eigenvalues, tol(s["A"]))
        for k in range(t.n_blocks):
            _check_eigenbasis(mf.gradient_eigenvectors[k], s["G"][k], mf.gradient_eigenvalues[k], tol(s["G"][k]))
        qa, qg = mf.activation_eigenvectors, mf.gradient_eigenvectors
        blocks = [head_rows(model, b, t.d_out) for b in t.block_names]
        # Λ: mean over documents of the squared gradient in the (validated) eigenbasis, block by block
        lam = torch.stack([(qg[k].T @ s["grads"][:, rows] @ qa).square().mean(0) for k, rows in enumerate(blocks)])
        torch.testing.assert_close(mf.lambda_, lam, **tol(lam))
        diagonal = s["grads"].square().mean(0)
        torch.testing.assert_close(mf.diagonal, diagonal, **tol(diagonal))
        # K-FAC eigenvalues: predicted tokens per document × products of the reference covariances' eigenvalues
        scale = tokens / n_docs
        ga = torch.stack([torch.diag(qg[k].T @ s["G"][k] @ qg[k]) for k in range(t.n_blocks)])
        kfac_values = scale * ga[:, :, None] * torch.diag(qa.T @ s["A"] @ qa)[None, None, :]
        torch.testing.assert_close(kfac.eigenvalues(t.name), kfac_values, **tol(kfac_values))
        # default damping: 0.1 × the mean eigenvalue of the module, each from the reference's own numbers
        kfac_damping = 0.1 * scale * float(torch.stack([g.trace() for g in s["G"]]).sum()) / (t.n_blocks * t.block_size) * float(s["A"].trace()) / t.d_in_total
        references = {"ekfac": 0.1 * float(lam.mean()), "kfac": kfac_damping, "diagonal": 0.1 * float(diagonal.mean())}
        for name, op in (("ekfac", ekfac), ("kfac", kfac), ("diagonal", diag)):
            assert op.module_damping(t.name) == pytest.approx(references[name], rel=tol(lam)["rtol"])
        # the operators against dense solves built from the reference alone (K-FAC, diagonal: no pretrace factor used)
        n = t.num_parameters
        dense_kfac, dense_ekfac = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
        for k, idx in enumerate(_dense_indices(model, t)):
            dense_kfac[idx[:, None], idx[None, :]] = scale * torch.kron(s["G"][k], s["A"])
            basis = torch.kron(qg[k], qa)
            dense_ekfac[idx[:, None], idx[None, :]] = basis @ torch.diag(lam[k].flatten()) @ basis.T
        v = vectors[t.name].flatten(1)
        eye = torch.eye(n, dtype=torch.float64)
        expected = {
            "kfac": torch.linalg.solve(dense_kfac + references["kfac"] * eye, v.T).T,
            "ekfac": torch.linalg.solve(dense_ekfac + references["ekfac"] * eye, v.T).T,
            "diagonal": v / (diagonal.flatten() + references["diagonal"]),
        }
        for name, value in expected.items():
            torch.testing.assert_close(ours[name][t.name].flatten(1), value, **tol(value))


@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_factors_equal_a_reference_from_scratch(arch, tokenizer, sentences):
    """Per-head A, G, Λ, diagonal, K-FAC eigenvalues, damping and all three inverses, fused QKV and grouped-query heads."""
    model = build_tiny_model(arch, tokenizer)
    tracked = select_modules(model, attention_blocks="head")
    assert any(t.n_blocks > 1 for t in tracked)
    factors = _fit(model, tracked, tokenizer, sentences, "empirical", padding_side="left" if arch == "gpt_neox" else "right")
    stats, tokens = hand_statistics(model, tracked, tokenizer, sentences)
    _check_against_reference(model, tracked, factors, stats, tokens, len(sentences), lambda ref: _tolerance(model, tokenizer, sentences, ref))


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_true_fisher_factors_equal_a_reference_with_the_same_sampled_labels(arch, tokenizer, sentences, monkeypatch):
    """The labels pretrace draws are recorded and fed to the hand-written loss: G (pass 1) and Λ, diagonal (pass 2,
    drawn again with another seed) must equal the reference with exactly those labels."""
    drawn = []
    original = task_module.sample_labels
    monkeypatch.setattr(task_module, "sample_labels", lambda logits, generator: drawn.append(original(logits, generator)) or drawn[-1])
    model = build_tiny_model(arch, tokenizer)
    tracked = select_modules(model, attention_blocks="head")
    factors = _fit(model, tracked, tokenizer, sentences, "true")
    lengths = [len(token_ids(tokenizer, s)) for s in sentences]
    per_pass = -(-len(sentences) // 3)
    assert len(drawn) == 2 * per_pass

    def labels(batches):  # right padding: row r of batch i is document 3i + r, its first n-1 positions predict
        rows = [row for batch in batches for row in batch]
        return [row[: n - 1] for row, n in zip(rows, lengths)]

    first, second = labels(drawn[:per_pass]), labels(drawn[per_pass:])
    assert any(not torch.equal(a, token_ids(tokenizer, s)[1:]) for a, s in zip(first, sentences))  # really sampled
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # the two passes draw independently
    tol = lambda ref: _tolerance(model, tokenizer, sentences, ref)
    pass1, tokens = hand_statistics(model, tracked, tokenizer, sentences, labels=first)
    pass2, _ = hand_statistics(model, tracked, tokenizer, sentences, labels=second)
    for t in tracked:
        mf = factors.modules[t.name]
        torch.testing.assert_close(mf.gradient_covariance, pass1[t.name]["G"], **tol(pass1[t.name]["G"]))
        qa, qg = mf.activation_eigenvectors, mf.gradient_eigenvectors
        grads = pass2[t.name]["grads"]
        lam = torch.stack([(qg[k].T @ grads[:, head_rows(model, b, t.d_out)] @ qa).square().mean(0) for k, b in enumerate(t.block_names)])
        torch.testing.assert_close(mf.lambda_, lam, **tol(lam))
        torch.testing.assert_close(mf.diagonal, grads.square().mean(0), **tol(grads.square().mean(0)))
    assert factors.metadata["tokens"] == tokens


def test_sampled_labels_are_drawn_from_each_positions_own_prediction(tokenizer, sentences, monkeypatch):
    """With the LM head scaled ×1e5 the model's predictions are one-hot to 1e-9, so the true Fisher's labels must be
    the hand-computed argmax at the same position; labels drawn from a neighbouring position's logits would not be
    (the recorded-label test above cannot see that, it reuses whatever was drawn)."""
    drawn = []
    original = task_module.sample_labels
    monkeypatch.setattr(task_module, "sample_labels", lambda logits, generator: drawn.append(original(logits, generator)) or drawn[-1])
    model = build_tiny_model("gpt_neox", tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e5)
    _fit(model, select_modules(model, preset="mlp"), tokenizer, sentences, "true")
    per_pass = -(-len(sentences) // 3)
    checked = 0
    for passed in (drawn[:per_pass], drawn[per_pass:]):
        rows = [row for batch in passed for row in batch]
        for row, text in zip(rows, sentences):
            ids = token_ids(tokenizer, text)
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
            top, argmax = probs.max(-1)
            sure = top > 1 - 1e-9
            assert torch.equal(row[: len(ids) - 1][sure], argmax[sure])
            checked += int(sure.sum())
    assert checked > 0.9 * 2 * sum(len(token_ids(tokenizer, s)) - 1 for s in sentences)  # nearly every position is decided
