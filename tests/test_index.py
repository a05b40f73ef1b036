"""The gradient index: stored document gradients score new queries like the streaming path."""


import pytest
import torch

from pretrace.curvature import EKFAC, FitSettings, fit_factors
from pretrace.data import Document, Query
from pretrace.data.batching import encode_queries, iter_batches
from pretrace.errors import PretraceError
from pretrace.modeling.modules import select_modules
from pretrace.scores import score_documents
from pretrace.scores.index import INDEX_FILE, IndexSettings, build_index, read_index, score_index
from pretrace.scores.queries import precondition_queries
from tiny import build_tiny_model, document_batches, interrupted, random_documents

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat .")]


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    tracked = select_modules(model)
    docs = [Document(str(i), s) for i, s in enumerate(sentences[:6])] + random_documents(7)
    factors = fit_factors(model, tracked, lambda: document_batches(tokenizer, docs), FitSettings(factor_dtype="float64"), progress=False)
    queries = precondition_queries(model, tracked, iter_batches(encode_queries(tokenizer, QUERIES, 64), 2, tokenizer.pad_token_id), EKFAC(factors))
    streamed = score_documents(model, tracked, queries.weights, document_batches(tokenizer, docs), queries.ids, per_module=True)
    return model, tracked, docs, queries, streamed


@pytest.mark.parametrize("storage", ["exact", "factored"])
def test_exact_storages_score_like_the_streaming_path(setup, tokenizer, tmp_path, storage):
    model, tracked, docs, queries, streamed = setup
    meta = build_index(model, tracked, document_batches(tokenizer, docs), tmp_path, IndexSettings(storage=storage, batches_per_shard=2), progress=False)
    assert len(meta["shards"]) == 3 and meta["document_ids"] == [d.id for d in docs]
    result = score_index(tmp_path, queries.weights, queries.ids, per_module=True)
    torch.testing.assert_close(result.scores, streamed.scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.per_module, streamed.per_module, rtol=1e-9, atol=1e-12)
    assert result.document_ids == streamed.document_ids and result.module_names == streamed.module_names


def test_interrupted_build_resumes_after_its_last_shard(setup, tokenizer, tmp_path):
    model, tracked, docs, queries, streamed = setup
    settings = IndexSettings(batches_per_shard=2)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, tracked, interrupted(document_batches(tokenizer, docs), 3), tmp_path, settings, progress=False)
    with pytest.raises(PretraceError, match="incomplete"):
        read_index(tmp_path)
    first = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    build_index(model, tracked, document_batches(tokenizer, docs), tmp_path, settings, progress=False)
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not recomputed
    torch.testing.assert_close(score_index(tmp_path, queries.weights, queries.ids).scores, streamed.scores, rtol=1e-9, atol=1e-12)


def test_mismatches_are_refused(setup, tokenizer, tmp_path):
    model, tracked, docs, queries, _ = setup
    build_index(model, tracked, document_batches(tokenizer, docs), tmp_path, signature={"documents_sha256": "abc"}, progress=False)
    with pytest.raises(PretraceError, match="other documents"):
        build_index(model, tracked, document_batches(tokenizer, docs), tmp_path, signature={"documents_sha256": "xyz"}, progress=False)
    with pytest.raises(PretraceError, match="documents sha256"):
        score_index(tmp_path, queries.weights, queries.ids, expected={"documents_sha256": "xyz"})
    with pytest.raises(PretraceError, match="lack"):
        score_index(tmp_path, {tracked[0].name: queries.weights[tracked[0].name]}, queries.ids)
    with pytest.raises(PretraceError, match="not a gradient index"):
        score_index(tmp_path / "nothing", queries.weights, queries.ids)
    with pytest.raises(PretraceError, match=r"--storage 'zip' is not one of \['exact', 'factored', 'sketch'\]"):
        IndexSettings(storage="zip")
    assert (tmp_path / INDEX_FILE).is_file()
