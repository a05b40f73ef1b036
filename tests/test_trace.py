"""`pretrace trace` end to end on tiny models: retrieval, candidate-only multi-stage scoring, ranking, the report."""

import json

import pytest
import torch

from pretrace.config import from_flags
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.report import find_chromium, load_page
from pretrace.retrieval import retrieval_recall
from pretrace.retrieval.bm25 import BM25Index
from pretrace.storage import read_json, read_jsonl_rows
from pretrace.training.finetune import FinetuneSettings, finetune
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.trace import TraceSettings, first_line, trace
from tiny import SENTENCES, save_tiny_model, write_jsonl

CORPUS = SENTENCES + [
    "paris is in france .", "berlin is in germany .", "the capital of italy is rome .", "madrid is the capital of spain .",
    "the cat ran in the sun .", "fish swim in the park .",
]
PAIRS = [("the capital of france is", " paris ."), ("the capital of germany is", " berlin ."), ("birds can", " fly .")]
QUERIES = [
    {"id": "france", "prompt": "the capital of france is", "completion": " paris .", "evidence_ids": ["d2", "d8"]},
    {"id": "spain", "prompt": "madrid is in", "completion": " spain .", "evidence_ids": ["d5", "d11"]},
    {"id": "cat", "prompt": "the cat sat on"},  # no completion: the fine-tuned model's greedy answer is traced
]
OPTIONS = ModelOptions(dtype="float64", device="cpu", batch_size=4, max_length=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    pretrained = save_tiny_model(root / "pt", "gpt_neox", dtype=torch.float64)
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    finetune(FinetuneSettings(model=str(pretrained), data=str(pairs), out=str(root / "ft"), alpha=0.05, lr=1e-2, epochs=3,
                              batch_size=2, dtype="float64", device="cpu", seed=0), progress=False)
    write_jsonl(root / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)])
    write_jsonl(root / "queries.jsonl", QUERIES)
    return root


def _settings(root, out, **kw):
    base = dict(pretrained=str(root / "pt"), finetuned=str(root / "ft"), corpus=str(root / "corpus.jsonl"),
                queries=str(root / "queries.jsonl"), out=str(root / out), top_k=4, max_new_tokens=3)
    if kw.get("retriever") != "none":
        base["candidates"] = 6
    return from_flags(TraceSettings, **{**base, **kw})


@pytest.fixture(scope="module")
def bm25_run(world):
    summary = trace(_settings(world, "bm25", retriever="bm25"), OPTIONS, progress=False)
    return world / "bm25", summary


def _direct_scores(root, out):
    """The whole corpus scored from scratch: α (H_ft + αI)⁻¹ (H_pt + 0.1·mean Λ I)⁻¹ built densely from the factors the
    trace fitted, with hand-written query and document gradients (prompt and completion as the trace recorded them)."""
    from dense import autograd_document_gradients, dense_eigenbasis_matrix, hand_query_gradients
    from pretrace.curvature import Factors
    from pretrace.modeling.modules import select_modules

    alpha = read_json(root / "ft" / "pretrace_finetune.json")["alpha"]
    pt, ft = load_model(root / "pt", "float64"), load_model(root / "ft", "float64")
    tokenizer = load_tokenizer(root / "pt")
    tracked = select_modules(pt)

    def inverse(folder, damping_of):  # (Q_G ⊗ Q_A) diag(1/(Λ+λ)) (Q_G ⊗ Q_A)ᵀ written out: the factors are float32, so
        factors = Factors.load(folder)  # Q is orthogonal only to ~1e-7 and a dense solve would differ from it there
        return torch.block_diag(*[dense_eigenbasis_matrix(mf.activation_eigenvectors, mf.gradient_eigenvectors, 1 / (mf.lambda_.double() + damping_of(mf)), 0.0)
                                  for mf in (factors.modules[t.name] for t in tracked)])

    p_pt = inverse(out / "factors" / "pretrained", lambda mf: 0.1 * float(mf.lambda_.double().mean()))
    p_ft = inverse(out / "factors" / "finetuned", lambda mf: alpha)
    queries = read_jsonl_rows(out / "queries.jsonl")
    q = hand_query_gradients(ft, select_modules(ft), tokenizer, [(row["prompt"], row["completion"]) for row in queries], max_length=32)
    d = autograd_document_gradients(pt, tracked, tokenizer, CORPUS, max_length=32)
    return alpha * q @ p_ft @ p_pt @ d.T


def test_results_rank_each_query_among_its_own_candidates(world, bm25_run):
    out, summary = bm25_run
    rows = read_jsonl_rows(out / "results.jsonl")
    direct = _direct_scores(world, out)
    texts = [json.loads(line)["prompt"] + json.loads(line)["completion"] for line in (out / "queries.jsonl").read_text().splitlines()]
    expected_indices, _ = BM25Index.build(CORPUS, show_progress=False).search(texts, 6)
    assert [row["query_id"] for row in rows] == ["france", "spain", "cat"]
    for q, row in enumerate(rows):
        candidates = expected_indices[q].tolist()
        best = sorted(candidates, key=lambda i: -float(direct[q, i]))[:4]
        documents = row["documents"]
        assert [doc["index"] for doc in documents] == best
        assert [doc["rank"] for doc in documents] == [1, 2, 3, 4]
        for doc in documents:
            assert doc["id"] == f"d{doc['index']}" and doc["text"] == CORPUS[doc["index"]]
            assert doc["retrieval_rank"] == candidates.index(doc["index"]) + 1
            assert doc["score"] == pytest.approx(float(direct[q, doc["index"]]), rel=1e-9, abs=1e-12)  # float64 scoring
    assert summary["distinct_candidates"] == len({i for row in expected_indices.tolist() for i in row})


def test_token_and_module_contributions_sum_to_the_score(bm25_run):
    out, _ = bm25_run
    for row in read_jsonl_rows(out / "results.jsonl"):
        for doc in row["documents"]:
            assert len(doc["tokens"]) == len(doc["token_scores"]) > 1
            assert sum(doc["token_scores"]) == pytest.approx(doc["score"], rel=1e-10, abs=1e-13)
            assert sum(doc["module_scores"].values()) == pytest.approx(doc["score"], rel=1e-10, abs=1e-13)


def test_missing_completion_is_the_fine_tuned_models_greedy_answer(world, bm25_run):
    out, _ = bm25_run
    model, tokenizer = load_model(world / "ft", "float64"), load_tokenizer(world / "ft")
    ids = tokenizer("the cat sat on", add_special_tokens=True)["input_ids"]
    for _ in range(3):  # plain argmax loop, independent of `generate`
        with torch.no_grad():
            ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    expected = " " + tokenizer.decode(ids[-3:], skip_special_tokens=True)
    queries = {row["id"]: row for row in read_jsonl_rows(out / "queries.jsonl")}
    assert queries["cat"]["generated"] and not queries["france"]["generated"]
    assert queries["cat"]["completion"].split() == expected.split()
    assert queries["france"]["completion"] == " paris ."


def test_retrieval_recall_of_the_evidence_is_reported(world, bm25_run):
    out, summary = bm25_run
    candidates = read_json(out / "candidates.json")["candidates"]
    expected = retrieval_recall(candidates, [[2, 8], [5, 11], []])
    assert summary["retrieval_recall"] == pytest.approx(expected)
    rows = {row["query_id"]: row for row in read_jsonl_rows(out / "results.jsonl")}
    assert rows["france"]["evidence_in_candidates"] == len({2, 8} & set(candidates[0]))
    assert all(doc["is_evidence"] == (doc["index"] in (2, 8)) for doc in rows["france"]["documents"])
    for name in ("report.html", "score_distributions.png", "layer_influence.png", "trace.json"):
        assert (out / name).is_file()


def test_finished_stages_are_reused(world, bm25_run, monkeypatch):
    out, first = bm25_run
    import pretrace.workflows.trace as module

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")

    for name in ("score", "fit", "generate_completions", "retrieve"):
        monkeypatch.setattr(module, name, refuse)
    before = (out / "results.jsonl").read_text()
    again = trace(_settings(world, "bm25", retriever="bm25"), OPTIONS, progress=False)
    assert (out / "results.jsonl").read_text() == before
    assert again["retrieval_recall"] == first["retrieval_recall"]


def test_no_retriever_scores_the_whole_corpus(world, bm25_run):
    out = world / "none"
    trace(_settings(world, "none", retriever="none", top_k=3, pretrained_factors=str(bm25_run[0] / "factors" / "pretrained"),
                    finetuned_factors=str(bm25_run[0] / "factors" / "finetuned")), OPTIONS, progress=False)
    direct = _direct_scores(world, bm25_run[0])
    for q, row in enumerate(read_jsonl_rows(out / "results.jsonl")):
        assert [doc["index"] for doc in row["documents"]] == torch.sort(direct[q], descending=True, stable=True).indices[:3].tolist()
        assert all(doc["retrieval_rank"] is None for doc in row["documents"])


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (Debian: apt-get install -y chromium)")
def test_report_opens_in_chromium_and_shows_every_query(bm25_run):
    out, _ = bm25_run
    loaded = load_page(out / "report.html")
    assert loaded.console == []
    for index, row in enumerate(read_jsonl_rows(out / "results.jsonl")):
        assert f'<section class="query" id="q{index + 1}"' in loaded.dom and row["query_id"] in loaded.dom
        assert json.dumps(row["prompt"])[1:-1] in loaded.dom
        for doc in row["documents"]:
            assert f"retrieval rank {doc['retrieval_rank']}" in loaded.dom
    assert loaded.dom.count('<section class="query"') == 3


def test_bad_inputs_are_refused(world, tmp_path):
    with pytest.raises(PretraceError, match="exceeds --candidates"):
        _settings(world, "x", candidates=2, top_k=4)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "the cat", "completion": " sat", "evidence_ids": ["nope"]}])
    with pytest.raises(PretraceError, match="--max-new-tokens has no effect: every query has a 'completion'"):
        trace(_settings(world, tmp_path / "bad", queries=str(queries), retriever="bm25"), OPTIONS, progress=False)
    with pytest.raises(PretraceError, match="not document ids"):
        trace(_settings(world, tmp_path / "bad", queries=str(queries), retriever="bm25", max_new_tokens=16), OPTIONS, progress=False)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "the cat"\n')
    with pytest.raises(PretraceError, match="not valid JSON"):
        trace(_settings(world, tmp_path / "malformed-out", queries=str(malformed), retriever="bm25"), OPTIONS, progress=False)
    with pytest.raises(PretraceError, match="no such folder"):
        trace(_settings(world, tmp_path / "no-model-out", pretrained=str(tmp_path / "missing-model"), retriever="bm25"), OPTIONS, progress=False)
    assert not (tmp_path / "malformed-out").exists() and not (tmp_path / "no-model-out").exists()  # refused before writing
    no_data = _settings(world, tmp_path / "nodata", finetune_data=str(tmp_path / "missing.jsonl"), retriever="bm25")
    with pytest.raises(PretraceError, match="--finetuned-factors"):
        trace(no_data, OPTIONS, progress=False)


def test_first_line_keeps_a_leading_break_but_cuts_at_the_next():
    assert first_line(" paris .\nnext") == " paris ."
    assert first_line("\n rome\nmore") == "\n rome"
    assert first_line(" madrid") == " madrid"


@pytest.mark.slow  # loading sentence-transformers and MiniLM takes ~10 s
def test_embedding_retriever_candidates_are_the_nearest_sentences(world, bm25_run):
    pytest.importorskip("sentence_transformers")
    from pretrace.retrieval.embedding import default_model_path, load_sentence_model

    try:
        encoder = load_sentence_model(default_model_path())
    except PretraceError as exc:
        pytest.skip(str(exc))
    factors = bm25_run[0] / "factors"
    trace(_settings(world, "embedding", retriever="embedding", pretrained_factors=str(factors / "pretrained"),
                    finetuned_factors=str(factors / "finetuned")), OPTIONS, progress=False)
    out = world / "embedding"
    texts = [row["prompt"] + row["completion"] for row in read_jsonl_rows(out / "queries.jsonl")]
    corpus = torch.from_numpy(encoder.encode(CORPUS, normalize_embeddings=True))
    queries = torch.from_numpy(encoder.encode(texts, normalize_embeddings=True))
    expected = torch.sort(queries @ corpus.T, dim=1, descending=True, stable=True).indices[:, :6]
    candidates = read_json(out / "candidates.json")["candidates"]
    assert [sorted(row) for row in candidates] == [sorted(row) for row in expected.tolist()]
    assert (out / "index-embedding" / "embeddings.npy").is_file()


def test_command_line_reuses_the_run_and_prints_the_recall(world, bm25_run, capsys):
    import argparse

    from pretrace.cli import trace as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["trace", "--pretrained", str(world / "pt"), "--finetuned", str(world / "ft"),
                              "--corpus", str(world / "corpus.jsonl"), "--queries", str(world / "queries.jsonl"),
                              "--out", str(bm25_run[0]), "--retriever", "bm25", "--candidates", "6", "--top-k", "4",
                              "--max-new-tokens", "3", "--dtype", "float64", "--device", "cpu", "--batch-size", "4",
                              "--max-length", "32"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert f"evidence recall: {bm25_run[1]['retrieval_recall']:.3f} within the candidates" in printed
    assert "report ->" in printed


def test_byte_level_tokens_show_the_text_they_encode():
    """Report text of a byte-level BPE document (SmolLM, GPT-2): characters split over tokens come out whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pretrace.report.html import display_tokens

    text = "Café in İzmir, 40\u00a0km from Łódź.\nNext line"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    encoding = tokenizer.encode(text)
    assert any(len(piece.encode()) > 1 and not piece.isascii() for piece in encoding.tokens)  # split characters occur
    shown = display_tokens(encoding.tokens)
    assert "".join(shown) == tokenizer.decode(encoding.ids) == text
    assert display_tokens(["▁the", "▁cat", "<0x0A>"]) == [" the", " cat", "\n"]


def test_gradient_retriever_recalls_the_top_of_the_exact_multi_stage_scores(world, bm25_run):
    """--retriever gradient: a corpus store of the pre-trained model's sketches (wide enough to be exact up to float16)
    and each query's top K by its sketched multi-stage score, which are the top K of the exact scores; the results
    rank those K exactly, as with any retriever."""
    out = world / "gradient"
    summary = trace(_settings(world, "gradient", retriever="gradient", sketch_dim=48, pretrained_factors=str(bm25_run[0] / "factors" / "pretrained"),
                              finetuned_factors=str(bm25_run[0] / "factors" / "finetuned")), OPTIONS, progress=False)
    direct = _direct_scores(world, bm25_run[0])
    candidates = read_json(out / "candidates.json")["candidates"]
    for q, row in enumerate(read_jsonl_rows(out / "results.jsonl")):
        exact = torch.sort(direct[q], descending=True, stable=True).indices
        assert set(candidates[q]) == set(exact[:6].tolist())
        assert [doc["index"] for doc in row["documents"]] == exact[:4].tolist()
    assert (out / "index-gradient" / "index.json").is_file() and summary["stages"]["index"] == "computed"
    again = trace(_settings(world, "gradient", retriever="gradient", sketch_dim=48, pretrained_factors=str(bm25_run[0] / "factors" / "pretrained"),
                            finetuned_factors=str(bm25_run[0] / "factors" / "finetuned")), OPTIONS, progress=False)
    assert again["stages"]["index"] == "reused" and again["stages"]["retrieval"] == "reused"
    with pytest.raises(PretraceError, match="--sketch-dim has no effect with --retriever bm25"):
        _settings(world, "x", retriever="bm25", sketch_dim=8)
