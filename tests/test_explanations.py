"""Explanations taken during the scoring pass: the right pairs (each query's top k, ties as `top_indices` breaks them,
or among each query's own candidates as trace ranks them) with the per-token and per-module contributions a full
per-token pass gives, and `score`/`trace` that need no second pass for them."""

from __future__ import annotations

import json

import pytest
import torch

from pretrace.config import from_flags
from pretrace.cli import main
from pretrace.curvature import EKFAC, FitSettings, Identity, fit_factors
from pretrace.data import Document, Query
from pretrace.data.batching import TokenBatch, encode_documents, encode_queries, iter_batches
from pretrace.gradients.capture import CapturedBatch
from pretrace.methods.gradient import PreconditionedGradients
from pretrace.modeling.modules import select_modules
from pretrace.scores import query_gradients, score_documents
from pretrace.scores.explanations import Explain, TopExplanations
from pretrace.scores.result import top_indices
from pretrace.scores.queries import precondition_queries
from pretrace.scores.weights import DenseWeights
from tiny import SENTENCES, build_tiny_model, save_tiny_model, write_jsonl

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat ."), Query("q2", "birds can fly and", " fish can swim .")]


def _stream(scores: torch.Tensor, explain: Explain, batch: int) -> set[tuple[int, int]]:
    """The pairs a tracker keeps when `scores` `[Q, N]` arrive `batch` documents at a time (explanations of a fake module)."""
    q, n = scores.shape
    tracker = TopExplanations(explain, list(range(q)))
    weights = {"m": DenseWeights(torch.ones(q, 1, 1, dtype=torch.float64))}
    for offset in range(0, n, batch):
        width = min(batch, n - offset)
        ones = torch.ones(width, 2, 1, dtype=torch.float64)
        tokens = TokenBatch([str(i) for i in range(width)], torch.zeros(width, 2, dtype=torch.long), torch.ones(width, 2, dtype=torch.long),
                            torch.ones(width, 2, dtype=torch.long))
        block = scores[:, offset:offset + width]
        tracker.offer(offset, tokens, CapturedBatch({"m": ones}, {"m": ones}, torch.zeros(width)), block, {"m": block}, weights)
    kept = tracker.finish()
    assert len(kept) <= q * explain.k  # pairs pushed out are dropped
    return set(kept)


@pytest.mark.parametrize("batch", [1, 3, 7, 40])
def test_kept_pairs_are_each_querys_top_k_with_ties_to_the_earlier_document(batch):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (4, 40), generator=generator).double()  # many ties
    top = top_indices(scores, 5)
    assert _stream(scores, Explain(5), batch) == {(q, int(d)) for q in range(4) for d in top[q]}


@pytest.mark.parametrize("batch", [1, 4, 40])
def test_kept_pairs_among_candidates_are_the_top_of_each_querys_own_list_ties_to_its_order(batch):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(-2, 3, (3, 40), generator=generator).double()
    among = [torch.randperm(40, generator=generator)[:9].tolist() for _ in range(3)]  # retrieval order, not document order
    expected = set()
    for q, row in enumerate(among):
        best = top_indices(scores[q, row].unsqueeze(0), 4)[0]
        expected |= {(q, row[int(i)]) for i in best}
    assert _stream(scores, Explain(4, among), batch) == expected
    fewer = _stream(scores, Explain(12, among), batch)  # k beyond a query's candidates: all of them, nothing else
    assert fewer == {(q, d) for q, row in enumerate(among) for d in row}


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model, attention_blocks="head")
    docs = [Document(str(i), s) for i, s in enumerate(sentences)]
    batches = lambda: iter_batches(encode_documents(tokenizer, docs, 64), 4, tokenizer.pad_token_id)  # noqa: E731
    factors = fit_factors(model, tracked, batches, FitSettings(factor_dtype="float64"), progress=False)
    return model, tracked, docs, batches, factors


@pytest.mark.parametrize("route", ["eigenbasis", "low-rank", "tokens", "dense"])
def test_explanations_equal_the_full_per_token_and_per_module_output(setup, tokenizer, route):
    model, tracked, docs, batches, factors = setup
    query_batches = iter_batches(encode_queries(tokenizer, QUERIES, 64), 3, tokenizer.pad_token_id)
    if route == "dense":
        ids, gradients = query_gradients(model, tracked, query_batches)
        weights = EKFAC(factors).apply(gradients)
    else:
        preconditioner = Identity() if route == "tokens" else EKFAC(factors)
        queries = precondition_queries(model, tracked, query_batches, preconditioner, query_rank=2 if route == "low-rank" else None)
        assert queries.route == ("tokens" if route == "tokens" else "eigenbasis")
        ids, weights = queries.ids, queries.weights
    result = score_documents(model, tracked, weights, batches(), ids, per_module=True, per_token=True, explain=Explain(3))
    top = top_indices(result.scores, 3)
    assert {(q, int(d)) for q in range(len(ids)) for d in top[q]} <= set(result.explanations)
    for (q, d), explanation in result.explanations.items():
        assert explanation.token_ids == result.document_token_ids[d]
        torch.testing.assert_close(explanation.token_scores, result.per_token[d][q], rtol=1e-9, atol=1e-12)
        assert list(explanation.module_scores) == result.module_names
        torch.testing.assert_close(torch.tensor(list(explanation.module_scores.values()), dtype=torch.float64), result.per_module[:, q, d],
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(explanation.token_scores.sum(), result.scores[q, d], rtol=1e-9, atol=1e-12)


def test_explanations_held_to_the_end_equal_those_computed_at_once(setup, tokenizer, monkeypatch):
    """With no room to hold token factors (every document explained as soon as it is held) the explanations are
    those computed at the end of the pass."""
    import pretrace.scores.explanations as explanations

    model, tracked, docs, batches, factors = setup
    query_batches = iter_batches(encode_queries(tokenizer, QUERIES, 64), 3, tokenizer.pad_token_id)
    queries = precondition_queries(model, tracked, query_batches, EKFAC(factors))
    held = score_documents(model, tracked, queries.weights, batches(), queries.ids, explain=Explain(3)).explanations
    monkeypatch.setattr(explanations, "HELD_BYTES", 0)
    at_once = score_documents(model, tracked, queries.weights, batches(), queries.ids, explain=Explain(3)).explanations
    assert set(held) == set(at_once)
    for pair, explanation in held.items():
        assert explanation.token_ids == at_once[pair].token_ids and explanation.module_scores == at_once[pair].module_scores
        torch.testing.assert_close(explanation.token_scores, at_once[pair].token_scores, rtol=1e-6, atol=1e-9)


def test_explanations_left_for_the_end_of_the_pass_count_as_explanation_time(setup, tokenizer, monkeypatch):
    """The per-token products that wait for the end of the pass run in `finish`: their time is the explanations',
    not the documents' (a slowed product shows where it is counted)."""
    import time

    model, tracked, docs, batches, factors = setup
    explain_waiting = TopExplanations._explain_waiting

    def slowed(self):
        if self.waiting:
            time.sleep(0.3)
        explain_waiting(self)

    monkeypatch.setattr(TopExplanations, "_explain_waiting", slowed)
    query_batches = iter_batches(encode_queries(tokenizer, QUERIES, 64), 3, tokenizer.pad_token_id)
    queries = precondition_queries(model, tracked, query_batches, EKFAC(factors))
    result = score_documents(model, tracked, queries.weights, batches(), queries.ids, explain=Explain(2))
    assert result.explanations and result.timings["explanation_seconds"] >= 0.3
    assert result.timings["documents_seconds"] < result.timings["explanation_seconds"] + 0.3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("explained")
    save_tiny_model(root / "model")
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"prompt": q.prompt, "completion": q.completion} for q in QUERIES])
    common = ["--device", "cpu", "--dtype", "float64", "--max-length", "32"]
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "f"), *common]) == 0
    return root, common


def _count_passes(monkeypatch) -> list[int]:
    """How many documents each scoring pass of a gradient method saw."""
    passes, score = [], PreconditionedGradients.score

    def counted(self, context, *args, **kwargs):
        passes.append(len(context.documents) if isinstance(context.documents, list) else -1)
        return score(self, context, *args, **kwargs)

    monkeypatch.setattr(PreconditionedGradients, "score", counted)
    return passes


def test_score_explains_its_top_documents_in_its_one_pass(workspace, monkeypatch):
    root, common = workspace
    passes = _count_passes(monkeypatch)
    out = root / "s"
    assert main(["score", "--model", str(root / "model"), "--factors", str(root / "f"), "--queries", str(root / "q.jsonl"),
                 "--train", str(root / "docs.jsonl"), "--out", str(out), "--top-k", "4", *common]) == 0
    assert passes == [-1]  # the documents' file, once: no second pass over the top documents
    meta = json.loads((out / "scores.json").read_text())
    assert meta["explanations"] == {"pairs": 12, "from_scoring_pass": 12, "rescored": 0}
    for row in (json.loads(line) for line in (out / "top_k.jsonl").read_text().splitlines()):
        for document in row["documents"]:
            assert abs(sum(document["token_scores"]) - document["score"]) <= 1e-9 * abs(document["score"]) + 1e-12
            assert abs(sum(document["module_scores"].values()) - document["score"]) <= 1e-9 * abs(document["score"]) + 1e-12


def test_explanations_of_scores_on_disk_equal_those_in_ram(workspace, monkeypatch):
    """float32 scores on disk may order a near-tie otherwise than the float64 pass: a pair the pass did not keep is
    rescored, so top_k.jsonl always has every explanation."""
    root, common = workspace
    base = ["score", "--model", str(root / "model"), "--factors", str(root / "f"), "--queries", str(root / "q.jsonl"),
            "--train", str(root / "docs.jsonl"), "--top-k", "4", *common]
    assert main([*base, "--out", str(root / "ram")]) == 0
    assert main([*base, "--out", str(root / "disk"), "--scores-on-disk"]) == 0
    ram, disk = ((root / name / "top_k.jsonl").read_text().splitlines() for name in ("ram", "disk"))
    for a, b in zip(ram, disk):
        for x, y in zip(json.loads(a)["documents"], json.loads(b)["documents"]):
            assert x["id"] == y["id"] and x["tokens"] == y["tokens"]
            torch.testing.assert_close(torch.tensor(x["token_scores"]), torch.tensor(y["token_scores"]), rtol=1e-9, atol=1e-12)


def test_pairs_a_pass_did_not_keep_are_rescored_to_the_same_explanation(workspace):
    """The fallback (scores from --index or a cache): the same explanations as the pass's own."""
    from pretrace.modeling.stage import ModelOptions
    from pretrace.methods.explain import explain_pairs, top_pairs
    from pretrace.workflows.score import ScoreSettings, build_context
    from pretrace.workflows.registry import make_attributor

    root, _ = workspace
    settings = from_flags(ScoreSettings, queries=str(root / "q.jsonl"), train=str(root / "docs.jsonl"), out=str(root / "unused"),
                             model=str(root / "model"), factors=str(root / "f"))
    options = ModelOptions(device="cpu", dtype="float64", max_length=32)
    context, attributor = build_context(settings, options), make_attributor(settings)
    attributor.fit(context)
    result = attributor.score(context, explain=Explain(3))
    pairs = top_pairs(top_indices(result.scores, 3))
    streamed = explain_pairs(attributor, context, pairs, result.explanations)
    rescored = explain_pairs(attributor, context, pairs, None)
    for pair in pairs:
        assert streamed[pair].token_ids == rescored[pair].token_ids
        torch.testing.assert_close(streamed[pair].token_scores, rescored[pair].token_scores, rtol=1e-9, atol=1e-12)
        assert streamed[pair].module_scores == pytest.approx(rescored[pair].module_scores, rel=1e-9, abs=1e-12)


def test_a_document_listed_twice_among_a_querys_candidates_ties_at_its_first_place():
    scores = torch.zeros(1, 5, dtype=torch.float64)  # every document ties
    assert _stream(scores, Explain(1, [[3, 1, 3]]), 2) == {(0, 3)}
    assert _stream(scores, Explain(1, [[1, 3, 1]]), 2) == {(0, 1)}


def test_a_part_saved_after_the_explanation_state_is_scored_again_whatever_the_save_interval(tmp_path):
    """Saved every 4 batches, killed between the part of batches 4-7 and its explanation state, resumed saving every
    3: the restore stops at the state's batches each time, never at the stale part."""
    from pretrace.scores.checkpoint import BatchScores, ScoringCheckpoint

    def batches(first, last):
        return [BatchScores(2 * i, [f"d{2 * i}", f"d{2 * i + 1}"], [torch.full((1, 2), float(i), dtype=torch.float64)]) for i in range(first, last)]

    def state(done):
        return {"values": torch.full((1,), float(done))}, {"done": done}

    every4 = ScoringCheckpoint(tmp_path, "signature", every=4)
    every4.save(4, batches(0, 4), state(4))
    every4.save(8, batches(4, 8), None)  # the part of batches 4-7 is in; its state never came
    restored, tensors, meta = every4.restore(explained=True)
    assert [b.offset for b in restored] == [0, 2, 4, 6] and meta == {"done": 4}
    every3 = ScoringCheckpoint(tmp_path, "signature", every=3)
    every3.save(6, batches(4, 6), state(6))
    restored, tensors, meta = every3.restore(explained=True)
    assert [float(b.totals[0][0, 0]) for b in restored] == [0, 1, 2, 3, 4, 5] and meta == {"done": 6}
    assert float(tensors["values"]) == 6
