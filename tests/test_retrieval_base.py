import pytest
import torch

from pretrace.errors import PretraceError
from pretrace.retrieval import Retriever, make_retriever, retrieval_recall
from pretrace.retrieval.base import check_k, corpus_sha256, top_k

TEXTS = ["Paris is the capital of France.", "Berlin is in Germany.", "Bananas are yellow.", "Rome is in Italy."]


def test_recall_is_micro_averaged_over_relevant_documents():
    candidates = torch.tensor([[0, 2], [1, 3], [2, 0]])
    # query 0: 1 of {0, 1}; query 1: 1 of {3}; query 2: 0 of {1}
    assert retrieval_recall(candidates, [{0, 1}, 3, [1]]) == pytest.approx(2 / 4)


def test_recall_skips_queries_without_relevant_documents_and_checks_shapes():
    assert retrieval_recall([[0], [1]], [[], [1]]) == 1.0
    with pytest.raises(PretraceError, match="one per query"):
        retrieval_recall([[0]], [0, 1])
    with pytest.raises(PretraceError, match="undefined"):
        retrieval_recall([[0]], [[]])


def test_top_k_breaks_ties_by_lower_index():
    indices, values = top_k(torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]]), 3)
    assert indices.tolist() == [[1, 2, 4]] and values.tolist() == [[3.0, 3.0, 3.0]]


def test_corpus_fingerprint_depends_on_order_and_boundaries():
    assert corpus_sha256(["ab", "c"]) != corpus_sha256(["a", "bc"])
    assert corpus_sha256(["a", "b"]) != corpus_sha256(["b", "a"])
    assert corpus_sha256(["a", "b"]) == corpus_sha256(("a", "b"))


def test_check_k_bounds():
    assert check_k(4, 4) == 4
    for bad in (0, 5, 2.0, True):
        with pytest.raises(PretraceError, match=f"k={bad} but the corpus has 4 documents; pass an integer k between 1 and 4"):
            check_k(bad, 4)


def test_make_retriever_bm25_builds_saves_and_reopens(tmp_path):
    retriever = make_retriever("bm25", TEXTS, folder=tmp_path / "index", show_progress=False)
    assert isinstance(retriever, Retriever)
    indices, _ = retriever.search(["capital of France"], k=2)
    assert indices[0, 0].item() == 0
    reopened = make_retriever("bm25", folder=tmp_path / "index")
    assert torch.equal(reopened.search(["capital of France"], k=2)[0], indices)


def test_make_retriever_rejects_bad_requests():
    with pytest.raises(PretraceError, match="unknown retriever"):
        make_retriever("tfidf", TEXTS)
    with pytest.raises(PretraceError, match="texts or the folder"):
        make_retriever("bm25")
    with pytest.raises(PretraceError, match="only to the embedding"):
        make_retriever("bm25", TEXTS, model="x")
    with pytest.raises(PretraceError, match="on disk"):
        make_retriever("embedding", TEXTS)
