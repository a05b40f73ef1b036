import math

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

from pretrace.errors import PretraceError
from pretrace.retrieval.bm25 import BM25Index, tokenize

# Without stopwords no word occurs in more than half of these documents, so Okapi's idf is never
# negative and rank_bm25 applies no epsilon floor: bm25s' "robertson" must then agree with it exactly.
DISTINCT = [
    "Paris is the capital of France and its largest city.",
    "Berlin is the capital of Germany; Berlin hosts the Bundestag.",
    "Rome, capital of Italy, was founded on seven hills.",
    "The Danube flows through Vienna and Budapest.",
    "Madrid lies on the Manzanares river in Spain.",
    "Lisbon sits at the mouth of the Tagus in Portugal.",
    "Bananas are yellow fruit rich in potassium.",
    "Potatoes came to Europe from South America.",
]
# "the" occurs in every document: Lucene's idf keeps it positive, Okapi's would be negative.
COMMON = [f"the {text}" for text in DISTINCT]
QUERIES = ["capital of France", "Berlin Berlin Germany", "river Spain Portugal", "yellow fruit", "the capital city of Italy"]
K1, B = 1.2, 0.75


def okapi(corpus, stopwords=False):
    return BM25Okapi([tokenize(text, stopwords) for text in corpus], k1=K1, b=B)


def document_frequency(reference, word):
    return sum(word in doc for doc in reference.doc_freqs)


def reference_scores(reference, queries, stopwords=False):
    rows = [reference.get_scores(tokenize(q, stopwords)) for q in queries]
    return torch.tensor(np.stack(rows), dtype=torch.float64)


def test_tokenize_is_word_level_lowercase():
    assert tokenize("The Capital of France, 2024!") == ["the", "capital", "of", "france", "2024"]
    assert tokenize("The Capital of France", stopwords=True) == ["capital", "france"]


def test_robertson_equals_rank_bm25_okapi():
    reference = okapi(DISTINCT, stopwords=True)
    assert all(2 * document_frequency(reference, word) <= len(DISTINCT) for word in reference.idf)
    index = BM25Index.build(DISTINCT, k1=K1, b=B, method="robertson", stopwords=True, show_progress=False)
    expected = reference_scores(reference, QUERIES, stopwords=True)
    # bm25s leaves out Okapi's constant (k1 + 1) factor
    torch.testing.assert_close(index.scores(QUERIES).double() * (K1 + 1), expected, rtol=1e-5, atol=1e-5)
    indices, values = index.search(QUERIES, k=3)
    assert indices.tolist() == torch.sort(expected, dim=1, descending=True, stable=True).indices[:, :3].tolist()
    torch.testing.assert_close(values.double() * (K1 + 1), expected.gather(1, indices), rtol=1e-5, atol=1e-5)


def test_lucene_equals_okapi_with_lucene_idf():
    reference = okapi(COMMON)
    n = len(COMMON)
    for word in reference.idf:
        df = document_frequency(reference, word)
        reference.idf[word] = math.log(1 + (n - df + 0.5) / (df + 0.5))
    index = BM25Index.build(COMMON, k1=K1, b=B, show_progress=False)
    torch.testing.assert_close(index.scores(QUERIES).double() * (K1 + 1), reference_scores(reference, QUERIES),
                               rtol=1e-5, atol=1e-5)
    assert index.search(["capital of France"], k=1)[0].item() == 0


def test_unknown_words_score_zero_and_search_still_answers():
    index = BM25Index.build(DISTINCT, show_progress=False)
    assert torch.count_nonzero(index.scores(["zzz qqq"])) == 0
    indices, values = index.search(["zzz", "capital of France"], k=2)
    assert indices.shape == (2, 2) and indices.dtype == torch.long and values.dtype == torch.float32
    assert indices[0].tolist() == [0, 1]  # all ties: lowest indices first
    assert indices[1, 0].item() == 0


def test_bad_inputs_are_pretrace_errors():
    index = BM25Index.build(DISTINCT, show_progress=False)
    with pytest.raises(PretraceError, match="k=9"):
        index.search(["x"], k=9)
    with pytest.raises(PretraceError, match="empty"):
        BM25Index.build([], show_progress=False)
    with pytest.raises(PretraceError, match="method"):
        BM25Index.build(DISTINCT, method="okapi", show_progress=False)


def test_save_load_round_trip_without_pickle(tmp_path):
    index = BM25Index.build(DISTINCT, stopwords=True, method="robertson", show_progress=False)
    index.save(tmp_path / "bm25")
    files = sorted(path.name for path in (tmp_path / "bm25").iterdir())
    assert files and all(name.endswith((".json", ".npy")) for name in files), files
    for name in files:
        if name.endswith(".npy"):
            np.load(tmp_path / "bm25" / name, allow_pickle=False)
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.stopwords and loaded.engine.method == "robertson"
    torch.testing.assert_close(loaded.scores(QUERIES), index.scores(QUERIES))


def test_open_or_build_reuses_and_refuses_other_corpus(tmp_path):
    folder = tmp_path / "bm25"
    built = BM25Index.open_or_build(DISTINCT, folder, show_progress=False)
    reopened = BM25Index.open_or_build(None, folder)
    torch.testing.assert_close(reopened.scores(QUERIES), built.scores(QUERIES))
    with pytest.raises(PretraceError, match="different corpus"):
        BM25Index.open_or_build(list(reversed(DISTINCT)), folder)
    with pytest.raises(PretraceError, match="not a complete `pretrace bm25-index` folder"):
        BM25Index.load(tmp_path)
