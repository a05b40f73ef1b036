"""Curvature-vector products and the exact / CG / LiSSA / Arnoldi inverses against dense matrices."""


import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dense import dense_gauss_newton, flatten, unflatten
from pretrace.config import from_flags
from pretrace.baselines.arnoldi import ArnoldiInverse, ritz_pairs
from pretrace.baselines.cg import ConjugateGradient
from pretrace.baselines.curvature_products import CurvatureProducts
from pretrace.baselines.exact import ExactInverse, dense_curvature
from pretrace.baselines.lissa import LiSSA
from pretrace.data import Document
from pretrace.data.batching import collate, encode_documents, iter_batches
from pretrace.errors import PretraceError
from pretrace.modeling.modules import select_modules
from pretrace.scores.io import load_scores
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.score import ScoreSettings, score
from tiny import build_tiny_model, save_tiny_model, write_jsonl

LAYER_ONE = r"\.1\."  # the second block's modules: a few thousand parameters, cross-module terms included


def _documents(sentences):
    return [Document(str(i), s) for i, s in enumerate(sentences)]


def _batches(tokenizer, docs, batch_size=3, padding_side="left"):
    return list(iter_batches(encode_documents(tokenizer, docs, 64), batch_size, tokenizer.pad_token_id, padding_side))


def _relative_error(estimate, reference):
    return float((estimate - reference).norm() / reference.norm())


def dense_hessian(model, tracked, tokenizer, documents):
    """Mean over documents of the Hessian of each one's summed loss, by torch.autograd.functional on a flat
    vector in the `[d_out, d_in']` layout substituted into the model with functional_call."""

    def mean_loss(flat):
        params, offset = {}, 0
        for t in tracked:
            block = flat[offset : offset + t.num_parameters].reshape(t.d_out, t.d_in_total)
            offset += t.num_parameters
            params[f"{t.name}.weight"] = block[:, : t.d_in].T if t.transposed else block[:, : t.d_in]
            if t.has_bias:
                params[f"{t.name}.bias"] = block[:, t.d_in]
        losses = []
        for encoded in encode_documents(tokenizer, documents, 64):
            ids = collate([encoded], 0).input_ids
            logits = torch.func.functional_call(model, params, (), {"input_ids": ids}).logits[0, :-1]
            losses.append(-torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())
        return torch.stack(losses).mean()

    flat = torch.cat([t.parameters_matrix().detach().flatten() for t in tracked])
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(mean_loss, flat, vectorize=True)


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    """GGN products over layer 1 of the tiny GPT-NeoX, and its dense Gauss-Newton matrix."""
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, regex=LAYER_ONE)
    docs = _documents(sentences)
    products = CurvatureProducts(model, tracked, _batches(tokenizer, docs), "ggn")
    return products, dense_gauss_newton(model, tracked, tokenizer, docs), tracked


@pytest.fixture(scope="module")
def queries(setup):
    products, _, _ = setup
    return torch.randn(3, products.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch,rtol", [("gpt_neox", 1e-10), ("gpt2", 1e-10), ("llama", 1e-6)])  # Llama's RMSNorm runs in float32
def test_gauss_newton_products_equal_dense_matrix(arch, rtol, tokenizer, sentences):
    model = build_tiny_model(arch, tokenizer)
    tracked = select_modules(model, regex=LAYER_ONE)
    docs = _documents(sentences)
    products = CurvatureProducts(model, tracked, _batches(tokenizer, docs), "ggn")
    vectors = torch.randn(4, products.num_parameters, dtype=torch.float64)
    reference = vectors @ dense_gauss_newton(model, tracked, tokenizer, docs)
    assert _relative_error(products(vectors), reference) < rtol
    assert products.document_products == 4 * len(docs)


def test_hessian_products_equal_dense_hessian(tokenizer, sentences):
    """GPT-2's transposed Conv1D weights, with biases, and the cross-module block between them."""
    model = build_tiny_model("gpt2", tokenizer)
    tracked = select_modules(model, regex=r"h\.1\.attn\.")
    docs = _documents(sentences[:4])
    products = CurvatureProducts(model, tracked, _batches(tokenizer, docs, batch_size=3), "hessian")
    hessian = dense_hessian(model, tracked, tokenizer, docs)
    vectors = torch.randn(3, products.num_parameters, dtype=torch.float64)
    assert _relative_error(products(vectors), vectors @ hessian) < 1e-10
    assert torch.linalg.eigvalsh(hessian)[0] < 0  # indefinite: the case CG and Cholesky must not meet silently


def test_exact_inverse_equals_dense_solve_and_relative_damping_uses_the_trace(setup, queries):
    products, gn, tracked = setup
    exact = ExactInverse(products, damping_factor=0.1)
    damping = 0.1 * float(gn.trace()) / len(gn)
    assert exact.damping == pytest.approx(damping, rel=1e-10) and exact.positive_definite
    assert products.mean_eigenvalue(seed=0) == pytest.approx(damping / 0.1, rel=0.1)  # what cg/lissa/arnoldi use
    solved = flatten(exact.apply(unflatten(queries, tracked)), tracked)
    reference = torch.linalg.solve(gn + damping * torch.eye(len(gn), dtype=gn.dtype), queries.T).T
    assert _relative_error(solved, reference) < 1e-9
    torch.testing.assert_close(dense_curvature(products), gn, rtol=1e-9, atol=1e-12)


def test_indefinite_hessian_takes_lu_in_exact_and_stops_cg(tokenizer, sentences):
    model = build_tiny_model("gpt2", tokenizer)
    tracked = select_modules(model, regex=r"h\.1\.attn\.c_proj")
    docs = _documents(sentences[:4])
    products = CurvatureProducts(model, tracked, _batches(tokenizer, docs), "hessian")
    exact = ExactInverse(products, damping=1e-3)
    hessian = dense_hessian(model, tracked, tokenizer, docs)
    assert not exact.positive_definite and torch.linalg.eigvalsh(hessian)[0] < -1e-3
    vectors = torch.randn(2, products.num_parameters, dtype=torch.float64)
    reference = torch.linalg.solve(hessian + 1e-3 * torch.eye(len(hessian), dtype=hessian.dtype), vectors.T).T
    assert _relative_error(exact.solve(vectors), reference) < 1e-8
    cg = ConjugateGradient(products, max_iterations=500, tolerance=1e-10, damping=1e-3)
    with pytest.warns(UserWarning, match="non-positive curvature"):
        cg.solve(vectors)
    assert all(cg.last_solve["negative_curvature"]) and not any(cg.last_solve["converged"])


def test_exact_refuses_too_many_parameters(setup):
    products, _, _ = setup
    with pytest.raises(PretraceError, match=f"{products.num_parameters} tracked parameters.*--method cg"):
        ExactInverse(products, max_parameters=1000)


def test_conjugate_gradient_matches_exact(setup, queries):
    products, gn, tracked = setup
    exact = ExactInverse(products, damping=0.05)
    cg = ConjugateGradient(products, max_iterations=500, tolerance=1e-8, damping=0.05)
    solved = flatten(cg.apply(unflatten(queries, tracked)), tracked)
    assert _relative_error(solved, exact.solve(queries)) < 1e-3
    record = cg.describe()["last_solve"]
    assert all(record["converged"]) and max(record["relative_residual"]) <= 1e-8
    assert all(1 < n < 500 for n in record["iterations"])


def test_conjugate_gradient_reports_queries_that_did_not_converge(setup, queries):
    products, _, _ = setup
    cg = ConjugateGradient(products, max_iterations=2, tolerance=1e-8, damping=0.05)
    with pytest.warns(UserWarning, match="3 of 3 queries did not reach"):
        cg.solve(queries)
    assert cg.last_solve["iterations"] == [2, 2, 2] and not any(cg.last_solve["converged"])
    assert min(cg.last_solve["relative_residual"]) > 1e-8


def test_lissa_matches_exact_with_full_batches_and_automatic_scale(tokenizer, sentences, setup, queries):
    products, gn, tracked = setup
    damping = 0.1 * float(torch.linalg.eigvalsh(gn)[-1])  # condition number ≤ 11: error ≤ (10/11)^depth
    full = CurvatureProducts(products.model, tracked, _batches(tokenizer, _documents(sentences), batch_size=len(sentences)), "ggn")
    lissa = LiSSA(full, depth=80, repeats=1, damping=damping)
    assert lissa.scale == pytest.approx(float(torch.linalg.eigvalsh(gn)[-1]) + damping, rel=1e-6)
    reference = torch.linalg.solve(gn + damping * torch.eye(len(gn), dtype=gn.dtype), queries.T).T
    # one full batch: x_T = Σ_{j≤T} (I − A/s)^j v exactly, so the error is (I − A/s)^(T+1) A⁻¹v, at most ρ^(T+1) relative
    rho = float((1 - (torch.linalg.eigvalsh(gn) + damping) / lissa.scale).abs().max())
    bound = rho ** (80 + 1)
    assert bound < 1e-3  # (10/11)^81 ≈ 4.5e-4: the test really asks for three digits
    assert _relative_error(lissa.solve(queries), reference) <= bound * (1 + 1e-6)


def test_lissa_refuses_a_diverging_recursion(setup, queries):
    products, gn, _ = setup
    lissa = LiSSA(products, depth=50, scale=0.1 * float(torch.linalg.eigvalsh(gn)[-1]), damping=1e-3)
    with pytest.raises(PretraceError, match="LiSSA diverged.*--lissa-scale"):
        lissa.solve(queries)


def test_arnoldi_recovers_top_eigenpairs(setup, queries):
    products, gn, tracked = setup
    values, vectors = torch.linalg.eigh(gn)
    top_values, top_vectors = values.flip(0)[:5], vectors.flip(1)[:, :5]
    ritz_values, _ = ritz_pairs(products, iterations=40, seed=1)
    torch.testing.assert_close(ritz_values[:5], top_values, rtol=1e-6, atol=0)
    arnoldi = ArnoldiInverse(products, rank=5, iterations=40, damping=0.5, seed=1)
    projection = top_vectors @ torch.diag(1 / (top_values + 0.5)) @ top_vectors.T
    solved = flatten(arnoldi.apply(unflatten(queries, tracked)), tracked)
    assert _relative_error(solved, queries @ projection) < 1e-5
    assert arnoldi.describe()["eigenvalues"] == pytest.approx(top_values.tolist(), rel=1e-6)


def test_solver_settings_are_checked(setup):
    products, _, _ = setup
    for make, message in [
        (lambda: ConjugateGradient(products, max_iterations=0), "--iterations"),
        (lambda: ConjugateGradient(products, tolerance=0, damping=1.0), "--tolerance"),
        (lambda: LiSSA(products, depth=0, damping=1.0), "--lissa-depth"),
        (lambda: LiSSA(products, scale=-1.0, damping=1.0), "--lissa-scale"),
        (lambda: ArnoldiInverse(products, rank=10, iterations=5, damping=1.0), "--arnoldi-rank"),
        (lambda: ExactInverse(products, damping=-1.0), "damping must be finite and non-negative"),
        (lambda: CurvatureProducts(products.model, products.layout.tracked, products.batches, "fisher"), "--curvature"),
    ]:
        with pytest.raises(PretraceError, match=message):
            make()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sentences):
    root = tmp_path_factory.mktemp("solvers")
    model = save_tiny_model(root / "model")
    queries = write_jsonl(root / "queries.jsonl", [{"id": "q0", "prompt": "paris is the capital of", "completion": " france ."},
                                                     {"id": "q1", "prompt": "the cat sat", "completion": " on the mat ."}])
    train = write_jsonl(root / "train.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(sentences)])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": "birds can", "completion": " fly ."}, {"prompt": "rome is in", "completion": " italy ."}])
    return root, str(model), queries, train, pairs


@pytest.mark.parametrize("method,settings", [
    ("exact", {}),
    ("cg", {"iterations": 300, "tolerance": 1e-4}),
    ("lissa", {"lissa_depth": 5, "lissa_repeats": 2, "damping": 1.0}),
    ("arnoldi", {"arnoldi_rank": 3, "arnoldi_iterations": 10}),
    ("exact", {"curvature": "hessian", "damping": 1e-3, "fit_data": "pairs"}),
])
def test_solvers_through_the_score_workflow(workspace, method, settings):
    root, model, queries, train, pairs = workspace
    settings = {**settings, **({"fit_data": pairs} if settings.get("fit_data") == "pairs" else {})}
    out = root / f"{method}-{len(settings)}"
    options = ModelOptions(device="cpu", dtype="float64", batch_size=4, modules=r"layers\.1\.mlp")
    result = score(from_flags(ScoreSettings, queries=queries, train=train, out=str(out), model=model, method=method, top_k=2, **settings), options)
    tensors, metadata = load_scores(out)
    assert tensors["scores"].shape == (2, 8) and torch.isfinite(result.scores).all()
    assert metadata["timings"]["one_off_seconds"] > 0 and metadata["timings"]["per_query_seconds"] > 0
    described = metadata["hyperparameters"]["preconditioner"]
    assert described["type"] == {"exact": "ExactInverse", "cg": "ConjugateGradient", "lissa": "LiSSA", "arnoldi": "ArnoldiInverse"}[method]
    assert described["curvature"] == settings.get("curvature", "ggn")
    assert described["fitting_documents"] == (2 if "fit_data" in settings else 8)
    if method == "cg":
        assert len(described["last_solve"]["iterations"]) == 2 and all(described["last_solve"]["converged"])


def test_solvers_refuse_multi_stage_and_missing_fit_data(workspace):
    root, model, queries, train, _ = workspace
    with pytest.raises(PretraceError, match="single-stage only"):
        score(from_flags(ScoreSettings, queries=queries, train=train, out=str(root / "multi"), pretrained=model, finetuned=model, alpha=1.0, method="cg"),
              ModelOptions(device="cpu", dtype="float64"))
    with pytest.raises(PretraceError, match="--fit-data"):
        score(from_flags(ScoreSettings, queries=queries, train=train, out=str(root / "missing"), model=model, method="cg", fit_data=str(root / "nope.jsonl")),
              ModelOptions(device="cpu", dtype="float64"))
