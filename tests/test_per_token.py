"""`score --per-token`: every document's per-token contributions, stored ragged, sum to its score."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrace.config import from_flags
from pretrace.cli import main
from pretrace.modeling.loading import load_tokenizer
from tiny import SENTENCES, save_tiny_model, write_jsonl

COMMON = ["--device", "cpu", "--dtype", "float64", "--max-length", "32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-token")
    save_tiny_model(root / "model")
    write_jsonl(root / "docs.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."}, {"text": "the dog ran in the sun ."}])
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "f"), *COMMON]) == 0
    assert main(["score", "--model", str(root / "model"), "--factors", str(root / "f"), "--queries", str(root / "q.jsonl"),
                 "--train", str(root / "docs.jsonl"), "--out", str(root / "s"), "--per-token", "--top-k", "3", *COMMON]) == 0
    return root


def test_per_token_contributions_sum_to_each_documents_score_and_name_its_tokens(run):
    tensors = load_file(str(run / "s" / "scores.safetensors"))
    offsets, scores, tokens = tensors["token_offsets"], tensors["scores"].double(), tensors["token_scores"].double()
    tokenizer = load_tokenizer(run / "model")
    assert offsets[0] == 0 and len(offsets) == len(SENTENCES) + 1 and offsets[-1] == tokens.shape[1] == len(tensors["token_ids"])
    for n, sentence in enumerate(SENTENCES):
        span = slice(int(offsets[n]), int(offsets[n + 1]))
        assert tensors["token_ids"][span].tolist() == tokenizer(sentence)["input_ids"]
        # float64 sums stored as float32: 1e-5 of the document's largest contribution
        torch.testing.assert_close(tokens[:, span].sum(1), scores[:, n], rtol=1e-5, atol=1e-5 * float(tokens[:, span].abs().max()))
    top = json.loads((run / "s" / "top_k.jsonl").read_text().splitlines()[0])["documents"][0]
    n = int(top["index"]) if "index" in top else [str(i) for i in range(len(SENTENCES))].index(top["id"])
    torch.testing.assert_close(torch.tensor(top["token_scores"], dtype=torch.float64), tokens[0, int(offsets[n]):int(offsets[n + 1])],
                               rtol=1e-5, atol=1e-6)


def test_per_token_is_refused_where_it_has_no_meaning(run, capsys):
    assert main(["index", "--model", str(run / "model"), "--train", str(run / "docs.jsonl"), "--out", str(run / "index"), *COMMON]) == 0
    model = ["--model", str(run / "model"), "--factors", str(run / "f"), *COMMON]
    for name, extra, why in (("bm25", ["--method", "bm25"], "--per-token has no effect with --method bm25"),
                             ("index", ["--index", str(run / "index"), *model], "--per-token has no effect with --index")):
        out = run / f"refused-{name}"
        assert main(["score", "--queries", str(run / "q.jsonl"), "--train", str(run / "docs.jsonl"), "--out", str(out), "--per-token", *extra]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err
        assert not out.exists()


def test_explanations_reuse_the_preconditioned_queries(run, monkeypatch):
    """The top documents' explanations score the same queries again: their gradients are prepared once."""
    import pretrace.methods.gradient as gradient
    from pretrace.modeling.stage import ModelOptions
    from pretrace.workflows.score import ScoreSettings, score

    calls = []
    original = gradient.precondition_queries
    monkeypatch.setattr(gradient, "precondition_queries", lambda *a, **k: calls.append(1) or original(*a, **k))
    settings = from_flags(ScoreSettings, queries=str(run / "q.jsonl"), train=str(run / "docs.jsonl"), out=str(run / "explained"),
                             model=str(run / "model"), factors=str(run / "f"), top_k=3)
    result = score(settings, ModelOptions(device="cpu", dtype="float64", max_length=32))
    assert len(calls) == 1
    rows = [json.loads(line) for line in (run / "explained" / "top_k.jsonl").read_text().splitlines()]
    tensors = load_file(str(run / "s" / "scores.safetensors"))  # the --per-token run: explanations computed afresh there too
    for q, row in enumerate(rows):
        for doc in row["documents"]:
            n = [str(i) for i in range(len(SENTENCES))].index(doc["id"])
            span = slice(int(tensors["token_offsets"][n]), int(tensors["token_offsets"][n + 1]))
            torch.testing.assert_close(torch.tensor(doc["token_scores"]), tensors["token_scores"][q, span], rtol=1e-5, atol=1e-6)
    assert result.scores.shape == (2, len(SENTENCES))
