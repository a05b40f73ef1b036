"""The compressed corpus store: its sketches against autograd gradients projected by hand, its scores against the
exact streaming path, its resumable build, and its two searches against brute force."""

from __future__ import annotations


import numpy
import pytest
import torch

from dense import autograd_document_gradients, unflatten
from pretrace.curvature import EKFAC, FitSettings, fit_factors
from pretrace.data import Document, Query
from pretrace.data.batching import encode_queries, iter_batches
from pretrace.errors import PretraceError
from pretrace.gradients.sketch import projections
from pretrace.modeling.modules import select_modules
from pretrace.scores import score_documents
from pretrace.scores.index import IndexSettings
from pretrace.scores.queries import precondition_queries
from pretrace.storage import mark_folder
from pretrace.store import CorpusStore, build_store
from pretrace.store.search import build_search
from tiny import build_tiny_model, document_batches, interrupted, random_documents

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat ."), Query("q2", "birds can", " fly .")]


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model)
    docs = [Document(str(i), s) for i, s in enumerate(sentences)] + random_documents(12)
    factors = fit_factors(model, tracked, lambda: document_batches(tokenizer, docs), FitSettings(factor_dtype="float64"), progress=False)
    queries = precondition_queries(model, tracked, iter_batches(encode_queries(tokenizer, QUERIES, 64), 3, tokenizer.pad_token_id), EKFAC(factors))
    streamed = score_documents(model, tracked, queries.weights, document_batches(tokenizer, docs), queries.ids)
    return model, tracked, docs, queries, streamed


def _store(setup, tokenizer, folder, **settings):
    model, tracked, docs, _, _ = setup
    meta = build_store(model, tracked, document_batches(tokenizer, docs), folder, IndexSettings(storage="sketch", **settings), progress=False)
    mark_folder(folder, "index", manifest=True)  # what `pretrace index` commits
    return meta, CorpusStore(folder)


def test_projections_are_unbiased_and_orthogonal_when_wide_enough():
    shapes = {"m": (6, 5)}
    mean = sum(p[0].T @ p[0] for p in (projections(shapes, 2, seed)["m"] for seed in range(4000))) / 4000
    torch.testing.assert_close(mean, torch.eye(6, dtype=torch.float64), atol=0.08, rtol=0)  # E[ΠᵀΠ] = I
    p_out, p_in = projections(shapes, 8, 0)["m"]
    torch.testing.assert_close(p_out.T @ p_out, torch.eye(6, dtype=torch.float64))  # k ≥ d: a rotation, exact


def test_document_sketches_are_autograd_gradients_projected_by_hand(setup, tokenizer, tmp_path):
    model, tracked, docs, _, _ = setup
    meta, store = _store(setup, tokenizer, tmp_path / "store", sketch_dim=4)
    sketch = projections({t.name: (t.d_out, t.d_in_total) for t in tracked}, 4, 0)
    grads = unflatten(autograd_document_gradients(model, tracked, tokenizer, docs), tracked)
    reference = torch.cat([(sketch[t.name][0] @ grads[t.name] @ sketch[t.name][1].T).flatten(1) for t in tracked], dim=1)
    stored = torch.from_numpy(store.rows(numpy.arange(len(docs)))).double()
    torch.testing.assert_close(stored, reference, rtol=2e-3, atol=2e-3 * float(reference.abs().max()))  # float16 storage
    assert meta["bytes_per_document"] == 2 * stored.shape[1] == 2 * sum(min(4, t.d_out) * min(4, t.d_in_total) for t in tracked)
    assert store.document_ids == [d.id for d in docs]


def test_sketched_scores_estimate_the_exact_ones_and_are_exact_up_to_float16_when_wide(setup, tokenizer, tmp_path):
    _, _, _, queries, streamed = setup
    errors = {}
    for dim in (4, 48):
        _, store = _store(setup, tokenizer, tmp_path / str(dim), sketch_dim=dim)
        result = store.score_result(queries.weights, queries.ids)
        assert result.document_ids == streamed.document_ids
        errors[dim] = float((result.scores - streamed.scores).norm() / streamed.scores.norm())
    assert errors[4] > 1e-3 and errors[48] < 2e-3  # k ≥ both sides of every module: only float16 rounding is left


def test_whitened_sketches_are_the_curvature_whitened_gradients_projected_and_stay_unbiased(setup, tokenizer, tmp_path):
    """Documents sketched as Π_out S^-½ ∇W A^-½ Π_inᵀ, queries as Π_out S^½ W A^½ Π_inᵀ: by hand from autograd
    gradients, and exact (up to float16) once k is wide."""
    from pretrace.store.build import curvature_whitening

    model, tracked, docs, queries, streamed = setup
    factors = fit_factors(model, tracked, lambda: document_batches(tokenizer, docs), FitSettings(factor_dtype="float64"), progress=False)
    whitening = curvature_whitening(factors)
    folder = tmp_path / "white"
    build_store(model, tracked, document_batches(tokenizer, docs), folder, IndexSettings(storage="sketch", sketch_dim=4), progress=False, whitening=whitening)
    mark_folder(folder, "index", manifest=True)
    store = CorpusStore(folder)
    sketch = projections({t.name: (t.d_out, t.d_in_total) for t in tracked}, 4, 0)
    grads = unflatten(autograd_document_gradients(model, tracked, tokenizer, docs), tracked)

    def power(matrix, exponent):
        values, vectors = torch.linalg.eigh(matrix)
        return (vectors * values ** exponent) @ vectors.T

    reference = torch.cat([(sketch[t.name][0] @ power(whitening[t.name][0], -0.5) @ grads[t.name] @ power(whitening[t.name][1], -0.5)
                            @ sketch[t.name][1].T).flatten(1) for t in tracked], dim=1)
    stored = torch.from_numpy(store.rows(numpy.arange(len(docs)))).double()
    torch.testing.assert_close(stored, reference, rtol=2e-3, atol=2e-3 * float(reference.abs().max()))
    wide = tmp_path / "wide"
    build_store(model, tracked, document_batches(tokenizer, docs), wide, IndexSettings(storage="sketch", sketch_dim=48), progress=False, whitening=whitening)
    mark_folder(wide, "index", manifest=True)
    result = CorpusStore(wide).score_result(queries.weights, queries.ids)
    assert float((result.scores - streamed.scores).norm() / streamed.scores.norm()) < 2e-3


def test_a_killed_build_resumes_to_the_same_store(setup, tokenizer, tmp_path):
    model, tracked, docs, _, _ = setup
    settings = IndexSettings(storage="sketch", batches_per_shard=2)
    with pytest.raises(KeyboardInterrupt):
        build_store(model, tracked, interrupted(document_batches(tokenizer, docs), 3), tmp_path / "killed", settings, progress=False)
    first = (tmp_path / "killed" / "shard-00000.safetensors").stat().st_mtime_ns
    build_store(model, tracked, document_batches(tokenizer, docs), tmp_path / "killed", settings, progress=False)
    build_store(model, tracked, document_batches(tokenizer, docs), tmp_path / "whole", settings, progress=False)
    assert (tmp_path / "killed" / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not sketched again
    for shard in sorted(p.name for p in (tmp_path / "whole").glob("shard-*")):
        assert (tmp_path / "killed" / shard).read_bytes() == (tmp_path / "whole" / shard).read_bytes()
    with pytest.raises(PretraceError, match="other documents, model or settings"):
        build_store(model, tracked, document_batches(tokenizer, docs), tmp_path / "whole", IndexSettings(storage="sketch", sketch_dim=3), progress=False)


def test_normalized_store_holds_unit_sketches(setup, tokenizer, tmp_path):
    _, store = _store(setup, tokenizer, tmp_path / "unit", normalize=True)
    norms = numpy.linalg.norm(store.rows(numpy.arange(len(store))), axis=1)
    numpy.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_flat_search_is_the_brute_force_top_k(setup, tokenizer, tmp_path):
    _, _, _, queries, _ = setup
    _, store = _store(setup, tokenizer, tmp_path / "flat", sketch_dim=6)
    sketched = store.sketch(queries.weights)
    scores, indices = store.search(sketched, 5)
    brute = torch.topk(store.scores(sketched).float(), 5, dim=1)
    assert torch.equal(indices, brute.indices)
    torch.testing.assert_close(scores, brute.values, rtol=1e-5, atol=1e-6)


def _synthetic_store(folder, count=6000, width=48, seed=0):
    """A store folder of random sketches (norms spread like gradients'), written as `build_store` writes one."""
    from pretrace.storage import SignedParts, write_record

    rng = numpy.random.default_rng(seed)
    centres = rng.standard_normal((40, width)) * 3  # gradients cluster (by topic, by length); isotropic noise would not
    vectors = (centres[rng.integers(0, 40, count)] + rng.standard_normal((count, width))) * rng.lognormal(0, 0.3, (count, 1))
    vectors = vectors.astype(numpy.float16)
    parts, shards = SignedParts(folder, {"synthetic": seed}, "test"), []
    for number, start in enumerate(range(0, count, 2500)):
        parts.save(f"shard-{number:05d}", {"vectors": torch.from_numpy(vectors[start:start + 2500])}, documents=len(vectors[start:start + 2500]))
        shards.append({"file": f"shard-{number:05d}.safetensors", "documents": len(vectors[start:start + 2500])})
    maps = [numpy.asarray(vectors[s:s + 2500]) for s in range(0, count, 2500)]
    search = build_search(maps, folder / "search.faiss", progress=False)
    write_record(folder / "index.json", {"storage": "sketch", "modules": {}, "sketch": {"dim": 0, "seed": 0, "width": width},
                                         "search": search, "shards": shards, "document_ids": [str(i) for i in range(count)]})
    return vectors


def test_quantised_search_finds_the_exact_top_k(tmp_path):
    pytest.importorskip("faiss")
    vectors = _synthetic_store(tmp_path)
    store = CorpusStore(tmp_path, verify=False)
    queries = torch.from_numpy(vectors[numpy.random.default_rng(1).choice(len(vectors), 20)].astype(numpy.float32))
    exact_scores, exact = store.exact_top(queries, 10)
    scores, found = store.search(queries, 10, candidates=200)  # 200 of 6,000 by their codes, re-scored exactly
    recall = numpy.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, exact)])
    assert recall >= 0.95
    agree = found == exact  # where the same document is found, its score is the exact one
    torch.testing.assert_close(scores[agree], exact_scores[agree])
    every = store.search(queries, 10, candidates=len(store))[1]
    assert torch.equal(every, exact)  # every document a candidate: exactly the brute-force top k


def test_the_commands_score_against_a_store_single_and_multi_stage(tmp_path, tokenizer, sentences, monkeypatch):
    """`pretrace index --storage sketch` then `score --index`: the multi-stage chain's query weights (fine-tuned model)
    against the store of the pre-trained model's sketches, equal to the exact scores but for float16 once k is wide."""
    import pretrace

    monkeypatch.chdir(tmp_path)
    pretrained = build_tiny_model("gpt_neox", tokenizer)
    finetuned = build_tiny_model("gpt_neox", tokenizer)
    finetuned.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in pretrained.state_dict().items()})
    documents = list(sentences) + [d.text for d in random_documents(10)]
    pairs = [{"prompt": q.prompt, "completion": q.completion} for q in QUERIES]
    pt_factors = pretrace.fit(pretrained, documents, tokenizer=tokenizer, progress=False)
    ft_factors = pretrace.fit(finetuned, pairs, tokenizer=tokenizer, progress=False)
    meta = pretrace.index(pretrained, documents, tmp_path / "store", tokenizer=tokenizer, storage="sketch", sketch_dim=48, progress=False)
    assert meta["storage"] == "sketch" and meta["search"]["kind"] == "flat" and (tmp_path / "store" / ".pretrace.json").is_file()
    chain = dict(pretrained=pretrained, finetuned=finetuned, pretrained_factors=pt_factors, finetuned_factors=ft_factors, tokenizer=tokenizer,
                 alpha=0.1, explain=False, progress=False)
    exact = pretrace.score(QUERIES, documents, **chain)
    stored = pretrace.score(QUERIES, documents, index=str(tmp_path / "store"), **chain)
    assert float((stored.scores - exact.scores).norm() / exact.scores.norm()) < 2e-3
    single = pretrace.score(QUERIES, documents, model=pretrained, factors=pt_factors, tokenizer=tokenizer, index=str(tmp_path / "store"),
                            explain=False, progress=False)
    direct = pretrace.score(QUERIES, documents, model=pretrained, factors=pt_factors, tokenizer=tokenizer, explain=False, progress=False)
    assert float((single.scores - direct.scores).norm() / direct.scores.norm()) < 2e-3
    with pytest.raises(PretraceError, match="--per-module has no effect with --index"):
        pretrace.score(QUERIES, documents, index=str(tmp_path / "store"), per_module=True, **chain)
    with pytest.raises(PretraceError, match="only shape --storage sketch"):
        pretrace.index(pretrained, documents, tmp_path / "other", tokenizer=tokenizer, sketch_dim=4)
