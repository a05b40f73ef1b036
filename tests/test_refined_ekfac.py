"""`ekfac-cg`: conjugate gradient preconditioned by the damped EK-FAC inverse, against dense solves.

References: the dense damped Gauss-Newton (built from one gradient per position and vocabulary entry, or from the
library's curvature products, themselves checked against it in test_baselines_solvers.py) and `torch.linalg.solve`.
"""

import json

import pytest
import torch

from dense import dense_gauss_newton, flatten, unflatten
from pretrace.baselines.cg import ConjugateGradient
from pretrace.baselines.curvature_products import CurvatureProducts, ParameterLayout
from pretrace.baselines.exact import dense_curvature
from pretrace.config import from_flags
from pretrace.curvature import EKFAC, FitSettings, Preconditioner, fit_factors
from pretrace.data import Document
from pretrace.data.records import Query, read_queries
from pretrace.errors import PretraceError
from pretrace.modeling.modules import select_modules
from pretrace.modeling.stage import ModelOptions, load_stage
from pretrace.scores.pairwise import query_gradients
from pretrace.training.finetune import FinetuneSettings, finetune
from pretrace.workflows.fit import fit
from pretrace.workflows.score import ScoreSettings, score
from tiny import SENTENCES, build_tiny_model, document_batches, save_tiny_model, write_jsonl

LAYER_ONE = r"\.1\."
DAMPING = 0.05
PT_DAMPING = 0.2  # H_pt's damping in the multi-stage tests: unlike α = 0.05, so a swap of the two cannot pass
PAIRS = [("the capital of france is", " paris ."), ("the capital of germany is", " berlin ."), ("birds can", " fly ."), ("fish can", " swim .")]
QUERIES = [("rome is in", " italy ."), ("the cat sat on", " the mat ."), ("the sun is", " hot .")]


class DenseInverse(Preconditioner):
    """M = (C + λI)⁻¹ from a dense matrix: with it, preconditioned CG must finish in one step."""

    def __init__(self, matrix: torch.Tensor, tracked):
        self.inverse, self.tracked = torch.linalg.inv(matrix), tracked

    def apply(self, grads):
        return unflatten(flatten(grads, self.tracked) @ self.inverse, self.tracked)


@pytest.fixture(scope="module")
def problem(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, regex=LAYER_ONE)
    docs = [Document(str(i), s) for i, s in enumerate(sentences)]
    batches = list(document_batches(tokenizer, docs))
    products = CurvatureProducts(model, tracked, batches, "ggn")
    factors = fit_factors(model, tracked, lambda: iter(batches), FitSettings(fisher="empirical", factor_dtype="float64"), progress=False)
    gn = dense_gauss_newton(model, tracked, tokenizer, docs)
    vectors = torch.randn(3, products.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(gn + DAMPING * torch.eye(len(gn), dtype=gn.dtype), vectors.T).T
    return products, factors, gn, tracked, vectors, exact


def _refined(products, factors, iterations, tolerance=1e-12):
    return ConjugateGradient(products, max_iterations=iterations, tolerance=tolerance, damping=DAMPING,
                             preconditioner=lambda damping: EKFAC(factors, damping=damping))


def _energy_error(solution, exact, gn):
    """‖x − x*‖_A per vector, A = C + λI: what CG (preconditioned or not) lowers at every step."""
    error = solution - exact
    return ((error @ gn) * error).sum(1).add(DAMPING * error.square().sum(1)).sqrt()


def test_exact_preconditioner_solves_in_one_iteration(problem):
    products, _, gn, tracked, vectors, exact = problem
    cg = ConjugateGradient(products, max_iterations=5, tolerance=1e-9, damping=DAMPING,
                           preconditioner=lambda damping: DenseInverse(gn + damping * torch.eye(len(gn), dtype=gn.dtype), tracked))
    solved = cg.solve(vectors)
    assert cg.last_solve["iterations"] == [1, 1, 1] and all(cg.last_solve["converged"])
    assert float((solved - exact).norm() / exact.norm()) < 1e-9


def test_first_iterate_is_ekfac_rescaled_and_converges_to_the_exact_solve(problem):
    products, factors, gn, tracked, vectors, exact = problem
    ekfac = flatten(EKFAC(factors, damping=DAMPING).apply(unflatten(vectors, tracked)), tracked)
    with pytest.warns(UserWarning, match="did not reach"):
        first = _refined(products, factors, 1).solve(vectors)
    cosine = torch.nn.functional.cosine_similarity(first, ekfac, dim=1)
    assert torch.allclose(cosine, torch.ones(3, dtype=cosine.dtype), atol=1e-12)
    refined = _refined(products, factors, 300, tolerance=1e-10)
    solved = refined.solve(vectors)
    assert float((solved - exact).norm() / exact.norm()) < 1e-8
    assert all(refined.last_solve["converged"]) and max(refined.last_solve["relative_residual"]) <= 1e-10


def test_each_iteration_lowers_the_energy_error_and_beats_plain_cg(problem):
    products, factors, gn, _, vectors, exact = problem
    errors, plain = [], []
    with pytest.warns(UserWarning):
        for iterations in (1, 2, 4, 8):
            errors.append(_energy_error(_refined(products, factors, iterations).solve(vectors), exact, gn))
            plain.append(_energy_error(ConjugateGradient(products, iterations, 1e-12, damping=DAMPING).solve(vectors), exact, gn))
    for before, after in zip(errors, errors[1:]):
        assert bool((after <= before * (1 + 1e-9)).all())
    assert all(bool((e < p).all()) for e, p in zip(errors[1:], plain[1:]))  # EK-FAC's start and metric pay off


def test_curvature_products_preconditioned_system_uses_the_library_damping_rule(problem):
    products, factors, *_ = problem
    relative = ConjugateGradient(products, 1, damping_factor=0.1, preconditioner=lambda damping: EKFAC(factors, damping=damping))
    assert relative.preconditioner.damping == pytest.approx(relative.damping)  # M is damped like the system it solves
    assert relative.describe()["preconditioner"]["type"] == "EKFAC"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("refined")
    pretrained = save_tiny_model(root / "pt", "gpt_neox", dtype=torch.float64)
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    write_jsonl(root / "queries.jsonl", [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(QUERIES)])
    finetune(FinetuneSettings(model=str(pretrained), data=str(root / "pairs.jsonl"), out=str(root / "ft"), alpha=0.05, lr=1e-2,
                              epochs=5, batch_size=2, dtype="float64", device="cpu", seed=0), progress=False)
    options = ModelOptions(dtype="float64", device="cpu", batch_size=3, preset="mlp")
    settings = FitSettings(fisher="empirical", factor_dtype="float64")
    fit(pretrained, root / "docs.jsonl", root / "f_pt", options, settings, progress=False)
    fit(root / "ft", root / "pairs.jsonl", root / "f_ft", options, settings, progress=False)
    return root, options


def _settings(root, method, out=None, **kw):
    return from_flags(ScoreSettings, queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=out,
                      pretrained=str(root / "pt"), finetuned=str(root / "ft"), pretrained_factors=str(root / "f_pt"),
                      finetuned_factors=str(root / "f_ft"), method=method, damping=PT_DAMPING, **kw)


def _gradients(root, options):
    """Flat query gradients on θ_ft and document gradients on θ_pt (documents as text-only queries: a query without
    completion measures its whole text's loss, as a scored document)."""
    pt_stage, ft_stage = load_stage(root / "pt", options), load_stage(root / "ft", options)
    layout = ParameterLayout(pt_stage.tracked)
    _, q = query_gradients(ft_stage.model, ft_stage.tracked, ft_stage.query_batches(read_queries(root / "queries.jsonl")))
    _, d = query_gradients(pt_stage.model, pt_stage.tracked, pt_stage.query_batches([Query(f"d{i}", s) for i, s in enumerate(SENTENCES)]))
    return layout.flatten(q).double(), layout.flatten(d).double()


def _dense(root, name, data, options):
    stage = load_stage(root / name, options)
    return dense_curvature(CurvatureProducts(stage.model, stage.tracked, list(stage.fitting_batches(data)()), "ggn"))


@pytest.mark.parametrize("finetuned_damping", [None, 0.5])
def test_multi_stage_refined_scores_equal_the_dense_chain(stages, finetuned_damping):
    """α (H_ft + λ_ft I)⁻¹ (H_pt + λ_pt I)⁻¹ with both curvatures exact, H_ft over the fine-tuning pairs' completions,
    λ_ft = α unless --finetuned-damping."""
    root, options = stages
    converged = score(_settings(root, "ekfac-cg", refine_iterations=500, tolerance=1e-12, finetuned_damping=finetuned_damping,
                                finetuned_fit_data=str(root / "pairs.jsonl")), options)
    alpha = 0.05
    h_pt, h_ft = _dense(root, "pt", root / "docs.jsonl", options), _dense(root, "ft", root / "pairs.jsonl", options)
    eye = torch.eye(len(h_pt), dtype=h_pt.dtype)
    q, d = _gradients(root, options)
    ft_damping = alpha if finetuned_damping is None else finetuned_damping
    reference = alpha * q @ torch.linalg.solve(h_ft + ft_damping * eye, torch.linalg.solve(h_pt + PT_DAMPING * eye, d.T))
    relative = float((converged.scores - reference).norm() / reference.norm())
    assert relative < 1e-7, relative


def test_single_stage_refined_scores_equal_the_dense_solve(stages):
    """(C + λI)⁻¹ of the pre-trained model over --fit-data, queries and documents on that model."""
    root, options = stages
    result = score(from_flags(ScoreSettings, queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=None,
                              model=str(root / "pt"), factors=str(root / "f_pt"), method="ekfac-cg", refine_iterations=500,
                              tolerance=1e-12, damping=PT_DAMPING, fit_data=str(root / "pairs.jsonl")), options)
    stage = load_stage(root / "pt", options)
    curvature = _dense(root, "pt", root / "pairs.jsonl", options)
    layout = ParameterLayout(stage.tracked)
    _, q = query_gradients(stage.model, stage.tracked, stage.query_batches(read_queries(root / "queries.jsonl")))
    _, d = _gradients(root, options)
    reference = layout.flatten(q).double() @ torch.linalg.solve(curvature + PT_DAMPING * torch.eye(len(curvature), dtype=curvature.dtype), d.T)
    assert float((result.scores - reference).norm() / reference.norm()) < 1e-7


def test_one_iteration_ranks_like_multi_stage_ekfac(stages, tmp_path):
    """With one iteration each inverse returns EK-FAC's solution times a positive per-query scalar."""
    root, options = stages
    with pytest.warns(UserWarning, match="did not reach"):
        one = score(_settings(root, "ekfac-cg", out=str(tmp_path / "one"), refine_iterations=1, finetuned_fit_data=str(root / "pairs.jsonl")), options)
    ekfac = score(_settings(root, "ekfac", finetuned_damping=None), options)
    ratio = one.scores / ekfac.scores
    assert bool((ratio > 0).all())
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9)
    described = json.loads((tmp_path / "one" / "scores.json").read_text())["hyperparameters"]["preconditioner"]["inner"]["operators"]
    assert [op["last_solve"]["iterations"] for op in described] == [[1, 1, 1], [1, 1, 1]]
    assert [op["damping"] for op in described] == [0.05, PT_DAMPING]  # H_ft damped by α, H_pt by --damping


def test_refuses_multi_stage_without_finetuning_data_and_single_stage_with_it(stages):
    root, _ = stages
    with pytest.raises(PretraceError, match="--factors-device has no effect"):
        _settings(root, "ekfac-cg", finetuned_fit_data=str(root / "pairs.jsonl"), factors_device="cpu")
    with pytest.raises(PretraceError, match="--finetuned-fit-data"):
        _settings(root, "ekfac-cg")
    with pytest.raises(PretraceError, match="--finetuned-fit-data has no effect"):
        from_flags(ScoreSettings, queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=None, model=str(root / "pt"),
                   factors=str(root / "f_pt"), method="ekfac-cg", finetuned_fit_data=str(root / "pairs.jsonl"))


class _DenseProducts:
    """A curvature-product stand-in over a given dense matrix C (ConjugateGradient reads only these members)."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.device, self.dtype, self.kind, self.num_documents, self.document_products = matrix, matrix.device, matrix.dtype, "ggn", 1, 0
        self.layout = type("Layout", (), {"num_parameters": len(matrix)})()
        self.num_parameters = len(matrix)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix


def _ill_conditioned(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))[0]
    return basis @ torch.diag(torch.logspace(-2, 1, size, dtype=torch.float64)) @ basis.T


def test_shared_subspace_is_never_worse_and_exact_once_the_queries_span_the_space():
    matrix, damping = _ill_conditioned(12, 0), 1e-2
    vectors = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(matrix + damping * torch.eye(12, dtype=torch.float64), vectors.T).T

    def energy(solution):
        error = solution - exact
        return ((error @ matrix) * error).sum(1) + damping * error.square().sum(1)

    for iterations in (1, 2, 3):
        own = ConjugateGradient(_DenseProducts(matrix), iterations, 1e-14, damping=damping).solve(vectors)
        solver = ConjugateGradient(_DenseProducts(matrix), iterations, 1e-14, damping=damping, shared_subspace=True)
        shared = solver.solve(vectors)
        assert (energy(shared) <= energy(own) * (1 + 1e-9)).all()
        assert 0 < solver.last_solve["shared_subspace_dimensions"] <= 3 * iterations  # nearly dependent directions are dropped
        residual = (vectors - shared @ matrix - damping * shared).norm(dim=1) / vectors.norm(dim=1)
        assert torch.allclose(torch.tensor(solver.last_solve["relative_residual"], dtype=torch.float64), residual, rtol=1e-6)
    assert float(energy(own).max()) > 1e-6  # 3 iterations alone are far from converged on this spectrum ...
    spanning = ConjugateGradient(_DenseProducts(matrix), 4, 1e-14, damping=damping, shared_subspace=True).solve(vectors)
    assert torch.allclose(spanning, exact, rtol=1e-7, atol=1e-9)  # ... 3 queries x 4 directions span all 12 dimensions


def test_shared_subspace_refines_the_library_ekfac_preconditioned_solve(problem):
    products, factors, gn, _, vectors, exact = problem
    own = _refined(products, factors, 2).solve(vectors)
    shared = ConjugateGradient(products, max_iterations=2, tolerance=1e-12, damping=DAMPING, shared_subspace=True,
                               preconditioner=lambda damping: EKFAC(factors, damping=damping)).solve(vectors)
    assert (_energy_error(shared, exact, gn) <= _energy_error(own, exact, gn) * (1 + 1e-9)).all()
    assert float(_energy_error(shared, exact, gn).sum()) < float(_energy_error(own, exact, gn).sum())
