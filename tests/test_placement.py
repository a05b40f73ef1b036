"""Placing factors (--factors-device cpu, --shard-factors) changes where they are applied, never the route the
scores take: capabilities are declared by each operator, and wrappers pass on their inner operator's.

The 2-process --shard-factors run is in test_distributed.py; here one process owns every module."""

import random

import pytest
import torch

from pretrace.config import from_flags
from pretrace.curvature import EKFAC, KFAC, Chain, Diagonal, Factors, FitSettings, Identity, PlacedPreconditioner, Scaled
from pretrace.data.records import read_queries
from pretrace.errors import PretraceError
from pretrace.scores.pairwise import query_gradients, score_documents
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.queries import precondition_queries
from pretrace.scores.weights import EigenbasisWeights
from pretrace.modeling.stage import ModelOptions, load_stage
from pretrace.workflows.fit import fit
from pretrace.workflows.registry import make_attributor
from pretrace.workflows.score import ScoreSettings, build_context, score
from tiny import WORDS, save_tiny_model, write_jsonl

OPTIONS = ModelOptions(batch_size=4, device="cpu")
QUERIES = [
    {"id": "q0", "prompt": "paris is the capital of", "completion": " france ."},
    {"id": "q1", "prompt": "the cat sat", "completion": " on the mat ."},
    {"id": "q2", "prompt": "birds can fly and", "completion": " fish can swim ."},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two float32 tiny models (standing in for pre-trained and fine-tuned), documents, queries, factors of each."""
    root = tmp_path_factory.mktemp("placement")
    save_tiny_model(root / "model", dtype=torch.float32)
    save_tiny_model(root / "tuned", seed=1, dtype=torch.float32)
    rng = random.Random(0)
    write_jsonl(root / "docs.jsonl", ({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))} for i in range(14)))
    write_jsonl(root / "queries.jsonl", QUERIES)
    for model, factors in (("model", "factors"), ("tuned", "factors_ft")):
        fit(root / model, root / "docs.jsonl", root / factors, OPTIONS, FitSettings(), progress=False)
    return root


def _scores(root, out, **settings):
    common = dict(queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=str(out), per_module=True, explain=False)
    return score(from_flags(ScoreSettings, **common, **settings), OPTIONS)


def _placed(root, device, by_module, **settings):
    """The scores `score` gives when it places the fitted factors (on a device, one module per rank): the same
    wrapping, in one process on the CPU, where the flags themselves would have no effect and are refused."""
    chosen = from_flags(ScoreSettings, queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out="unused", **settings)
    context = build_context(chosen, OPTIONS)
    attributor = make_attributor(chosen, context.alpha)
    attributor.fit(context)
    attributor.preconditioner = PlacedPreconditioner(attributor.preconditioner, [t.name for t in context.document_stage.tracked], device, by_module)
    return attributor.score(context, per_module=True), attributor.query_route


def test_capabilities_are_declared_and_passed_on_by_wrappers(workspace):
    factors = Factors.load(workspace / "factors")
    names = factors.module_names()
    ekfac = EKFAC(factors)
    assert ekfac.kronecker_eigenbasis and KFAC(factors).kronecker_eigenbasis
    assert not any(op.kronecker_eigenbasis for op in (Diagonal(factors), Identity(), Chain([ekfac, Diagonal(factors)])))
    assert Scaled(ekfac, 2.0).kronecker_eigenbasis and Scaled(Chain([ekfac, KFAC(factors)]), 2.0).kronecker_eigenbasis  # a chain ends in its last basis
    assert PlacedPreconditioner(ekfac, names, "cpu").kronecker_eigenbasis
    assert not PlacedPreconditioner(Identity(), names, "cpu").kronecker_eigenbasis
    assert Identity().is_identity and PlacedPreconditioner(Identity(), names, "cpu").is_identity
    assert not any(op.is_identity for op in (Scaled(Identity(), 1.0), ekfac))
    with pytest.raises(PretraceError, match="Kronecker eigenbasis"):
        Identity().eigenbasis(names[0], torch.device("cpu"), torch.float32)


def test_scaled_and_placed_eigenbasis_products_equal_the_inner_operator(workspace):
    factors = Factors.load(workspace / "factors")
    names = factors.module_names()
    ekfac, cpu = EKFAC(factors), torch.device("cpu")
    placed = PlacedPreconditioner(EKFAC(factors), names, "cpu", by_module=True)  # one process: it owns every module
    scaled = Scaled(EKFAC(factors), 0.25)
    generator = torch.Generator().manual_seed(0)
    for name, mf in factors.modules.items():
        d_out, d_in = mf.lambda_.shape[0] * mf.lambda_.shape[1], mf.lambda_.shape[2]
        g, a = torch.randn(2, 5, d_out, generator=generator), torch.randn(2, 5, d_in, generator=generator)
        reference = ekfac.apply_factored_in_eigenbasis(name, g, a)
        assert torch.equal(placed.apply_factored_in_eigenbasis(name, g, a), reference)
        torch.testing.assert_close(scaled.apply_factored_in_eigenbasis(name, g, a), 0.25 * reference, rtol=1e-6, atol=0)
        for mine, theirs in zip(placed.eigenbasis(name, cpu, torch.float32), ekfac.eigenbasis(name, cpu, torch.float32)):
            assert torch.equal(mine, theirs)
    with pytest.raises(PretraceError, match="not among the modules"):
        PlacedPreconditioner(ekfac, names[1:], by_module=True).apply_factored_in_eigenbasis(names[0], g, a)


def test_placed_factors_take_the_eigenbasis_route(workspace):
    stage = load_stage(workspace / "model", OPTIONS)
    factors, queries = Factors.load(workspace / "factors"), read_queries(workspace / "queries.jsonl")
    names = [t.name for t in stage.tracked]
    for placed in (PlacedPreconditioner(EKFAC(factors), names, "cpu"), PlacedPreconditioner(EKFAC(factors), names, by_module=True)):
        weights = precondition_queries(stage.model, stage.tracked, stage.query_batches(queries), placed).weights
        assert {type(w) for w in weights.values()} == {EigenbasisWeights}
    placed = precondition_queries(stage.model, stage.tracked, stage.query_batches(queries), PlacedPreconditioner(Identity(), names, "cpu"))
    assert placed.route == "tokens"  # as unplaced: placing an identity changes nothing


def test_placing_or_sharding_factors_scores_exactly_like_the_default(workspace, tmp_path):
    """Bit-identical scores, single- and multi-stage: the same route with the same arithmetic; the default
    itself agrees with the dense formula (query gradients · P · document gradients, P applied densely)."""
    root = workspace
    single = dict(model=str(root / "model"), factors=str(root / "factors"))
    multi = dict(pretrained=str(root / "model"), pretrained_factors=str(root / "factors"), finetuned=str(root / "tuned"),
                 finetuned_factors=str(root / "factors_ft"), alpha=0.5, force=True)
    for kind, settings, route in (("single", single, "eigenbasis"), ("multi", multi, "eigenbasis")):  # a chain ends in its last eigenbasis
        default = _scores(root, tmp_path / kind, **settings)
        for device, by_module in (("cpu", False), (None, True), ("cpu", True)):
            placed, placed_route = _placed(root, device, by_module, **settings)
            assert torch.equal(placed.scores, default.scores), (kind, device, by_module)
            assert torch.equal(placed.per_module, default.per_module), (kind, device, by_module)
            assert placed_route == route
    stage = load_stage(root / "model", OPTIONS)
    ids, grads = query_gradients(stage.model, stage.tracked, stage.query_batches(read_queries(root / "queries.jsonl")))
    dense = score_documents(stage.model, stage.tracked, EKFAC(Factors.load(root / "factors")).apply(grads), stage.document_batches(root / "docs.jsonl")(), ids)
    single_default = _scores(root, tmp_path / "again", **single)
    torch.testing.assert_close(single_default.scores, dense.scores, rtol=1e-5, atol=1e-5 * float(dense.scores.abs().max()))


def test_scoring_plan_is_a_checked_value():
    with pytest.raises(PretraceError, match="cannot split scoring by 'modules'"):
        ScoringPlan("modules")
    plan = ScoringPlan("queries", "spill")
    assert not plan.splits_queries  # one process: nothing to split
    assert plan.spill_folder.name == "spill" and ScoringPlan().spill_folder is None
