"""The all-parameters scope (--preset all-parameters): gradient methods and solvers over every parameter of the
model against references built from plain autograd over `model.parameters()`, independent of our layout."""

import json
import re

import pytest
import torch

from dense import autograd_document_gradients
from pretrace.config import from_flags
from pretrace.baselines.trak import TRAK
from pretrace.data import Document, Query
from pretrace.data.batching import collate, encode_documents, encode_queries
from pretrace.errors import PretraceError
from pretrace.gradients import LanguageModelingTask
from pretrace.methods.base import ScoringContext
from pretrace.modeling.modules import ALL_PARAMETERS
from pretrace.scores.io import load_scores
from pretrace.modeling.stage import ModelOptions, load_stage
from pretrace.workflows.fit import fit
from pretrace.workflows.score import ScoreSettings, score
from test_baselines_similarity import autograd_query_gradients
from test_baselines_trak import full_matrix
from tiny import save_tiny_model, train_tokenizer, write_jsonl

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat .")]
SOLVER_SCOPE = r"wte|ln_f|h\.1\.mlp\.c_proj"  # GPT-2: the tied embedding / LM head, a norm and a Conv1D with bias


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sentences):
    root = tmp_path_factory.mktemp("scope")
    queries = write_jsonl(root / "queries.jsonl", [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in QUERIES])
    train = write_jsonl(root / "train.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(sentences)])
    return root, queries, train, [Document(f"d{i}", s) for i, s in enumerate(sentences)]


def _run(root, arch, method, queries, train, regex=None, **settings):
    model = save_tiny_model(root / arch, arch=arch) if not (root / arch).exists() else root / arch
    options = ModelOptions(device="cpu", dtype="float64", batch_size=3, preset=ALL_PARAMETERS, modules=regex, max_length=64)
    out = root / f"{arch}-{method}-{len(list(root.iterdir()))}"
    result = score(from_flags(ScoreSettings, queries=queries, train=train, out=str(out), model=str(model), method=method, top_k=2, explain=False, **settings), options)
    return result, load_scores(out)[1], model


def _parameters(model, regex):
    return [p for name, p in model.named_parameters() if regex is None or re.search(regex, name)]


def _gradients(model, regex, items, loss):
    """[N, P]: one backward pass per item of its summed loss, over the selected model.parameters()."""
    params, rows = _parameters(model, regex), []
    for encoded in items:
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss(model, collate([encoded], 0)).sum(), params)]))
    return torch.stack(rows)


def _query_and_document_gradients(folder, docs, regex=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tokenizer, task = train_tokenizer(), LanguageModelingTask()
    queries = _gradients(model, regex, encode_queries(tokenizer, QUERIES, 64), task.measurement)
    documents = _gradients(model, regex, encode_documents(tokenizer, docs, 64), task.document_loss)
    return model, tokenizer, queries, documents


def _dense_gauss_newton(model, tokenizer, docs, regex):
    """Mean over documents of Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over the selected parameters."""
    params, total = _parameters(model, regex), 0
    for encoded in encode_documents(tokenizer, docs, 64):
        batch = collate([encoded], 0)
        logits = model(input_ids=batch.input_ids).logits[0]
        probs = torch.softmax(logits.detach(), -1)
        rows = []
        for t in torch.nonzero(batch.predict_mask[0]).flatten():
            cotangents = torch.zeros(logits.shape[-1], *logits.shape, dtype=logits.dtype)
            cotangents[:, t] = probs[t].sqrt()[:, None] * (torch.eye(logits.shape[-1], dtype=logits.dtype) - probs[t][None, :])
            grads = torch.autograd.grad(logits, params, cotangents, is_grads_batched=True, retain_graph=True)
            rows.append(torch.cat([g.flatten(1) for g in grads], dim=1))
        jacobian = torch.cat(rows)
        total = total + jacobian.T @ jacobian
    return total / len(docs)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_gradient_dot_and_cosine_over_all_parameters_equal_full_gradient_products(workspace, arch):
    root, queries, train, docs = workspace
    dot, metadata, folder = _run(root, arch, "gradient-dot", queries, train, self_influence=True)
    _, _, q, d = _query_and_document_gradients(folder, docs)
    torch.testing.assert_close(dot.scores, q @ d.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dot.self_influence, (d * d).sum(1), rtol=1e-9, atol=1e-12)
    assert len(dot.module_names) > 10 and metadata["options"]["preset"] == ALL_PARAMETERS
    cosine, _, _ = _run(root, arch, "gradient-cosine", queries, train)
    torch.testing.assert_close(cosine.scores, (q @ d.T) / (q.norm(dim=1)[:, None] * d.norm(dim=1)[None]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,settings,rtol", [("exact", {}, 1e-8), ("cg", {"iterations": 500, "tolerance": 1e-10}, 1e-6)])
def test_exact_and_cg_over_all_parameters_equal_a_dense_solve(workspace, method, settings, rtol):
    root, queries, train, docs = workspace
    damping = 0.05
    result, metadata, folder = _run(root, "gpt2", method, queries, train, regex=SOLVER_SCOPE, damping=damping, **settings)
    model, tokenizer, q, d = _query_and_document_gradients(folder, docs, SOLVER_SCOPE)
    gauss_newton = _dense_gauss_newton(model, tokenizer, docs, SOLVER_SCOPE)
    assert metadata["hyperparameters"]["preconditioner"]["parameters"] == len(gauss_newton) == 34 * 16 + 2 * 16 + 65 * 16
    expected = q @ torch.linalg.solve(gauss_newton + damping * torch.eye(len(gauss_newton), dtype=torch.float64), d.T)
    torch.testing.assert_close(result.scores, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_kronecker_methods_refuse_and_explanations_are_left_out(workspace):
    root, queries, train, _ = workspace
    with pytest.raises(PretraceError, match="--method ekfac needs Kronecker-factored linear modules.*--preset all"):
        _run(root, "gpt2", "ekfac", queries, train, factors=str(root / "any-factors"))  # refused before the factors are read
    with pytest.raises(PretraceError, match="pretrace fit needs Kronecker-factored linear modules"):
        fit(str(root / "gpt2"), train, str(root / "refused-factors"), ModelOptions(device="cpu", preset=ALL_PARAMETERS))
    assert not (root / "refused-factors").exists()
    folder = root / "gpt2"
    options = ModelOptions(device="cpu", dtype="float64", preset=ALL_PARAMETERS)
    with pytest.warns(UserWarning, match="no per-token explanations"):
        score(from_flags(ScoreSettings, queries=queries, train=train, out=str(root / "explained"), model=str(folder), method="identity", top_k=2), options)
    assert "token_scores" not in json.loads((root / "explained" / "top_k.jsonl").read_text().splitlines()[0])["documents"][0]


def test_trak_over_all_parameters_equals_the_dense_kernel_formula(workspace, tokenizer):
    """Projections of every parameter's gradient (our layout, checked against model.parameters() in
    test_core_gradients), then TRAK's kernel formula."""
    root, _, _, docs = workspace
    folder = root / "gpt2" if (root / "gpt2").exists() else save_tiny_model(root / "gpt2", arch="gpt2")
    stage = load_stage(folder, ModelOptions(device="cpu", dtype="float64", batch_size=3, preset=ALL_PARAMETERS, max_length=64))
    context = ScoringContext(stage, stage, docs, QUERIES)
    trak = TRAK(projection_dim=10, projection="gaussian", seed=2, damping=1e-3)
    trak.fit(context)
    projection = full_matrix(trak.fitted[0].projector, stage.tracked)
    phi = autograd_document_gradients(stage.model, stage.tracked, tokenizer, docs) @ projection
    queries = autograd_query_gradients(stage.model, stage.tracked, tokenizer, QUERIES) @ projection
    expected = queries @ torch.linalg.solve(phi.T @ phi + 1e-3 * torch.eye(10, dtype=torch.float64), phi.T)
    torch.testing.assert_close(trak.score(context).scores, expected, rtol=1e-7, atol=1e-9)
