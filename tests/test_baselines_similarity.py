"""Gradient dot/cosine/CKA and representation similarity against autograd and output_hidden_states references,
and every similarity method through the score workflow."""

import json
import random

import pytest
import torch

from dense import autograd_document_gradients, hand_query_gradients
from pretrace.config import from_flags
from pretrace.methods.config import METHODS
from pretrace.baselines.similarity import GradientCosine, RepresentationSimilarity, build_gradient_dot
from pretrace.data import Document, Query
from pretrace.data.batching import encode_queries
from pretrace.errors import PretraceError
from pretrace.methods.base import ScoringContext
from pretrace.modeling.modules import select_modules
from pretrace.scores.io import load_scores
from pretrace.modeling.stage import ModelOptions, Stage
from pretrace.workflows.score import ScoreSettings, score
from tiny import WORDS, build_tiny_model, save_tiny_model

QUERIES = [Query("q0", "paris is the capital of", " france ."), Query("q1", "the cat sat", " on the mat ."),
           Query("q2", "birds can fly and fish can swim .")]


def random_documents(n, seed=0):
    rng = random.Random(seed)
    return [Document(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))) for i in range(n)]


def stage(model, tokenizer, batch_size=3, padding_side="left"):
    options = ModelOptions(device="cpu", batch_size=batch_size, padding_side=padding_side, max_length=64)
    return Stage(None, model, tokenizer, select_modules(model), options)


def autograd_query_gradients(model, tracked, tokenizer, queries):
    """[Q, P]: one backward pass of each query's hand-written completion loss (the whole text's without a completion)."""
    return torch.cat([hand_query_gradients(model, tracked, tokenizer, [(q.prompt, q.completion)]) if q.completion is not None
                      else autograd_document_gradients(model, tracked, tokenizer, [q.prompt]) for q in queries])


@pytest.fixture(scope="module")
def setup(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    docs = [Document(str(i), s) for i, s in enumerate(sentences)] + random_documents(7)
    return stage(model, tokenizer), docs


def test_gradient_cosine_and_cka_equal_autograd_reference(setup, tokenizer):
    s, docs = setup
    context = ScoringContext(s, s, docs, QUERIES)
    queries = autograd_query_gradients(s.model, s.tracked, tokenizer, QUERIES)
    documents = autograd_document_gradients(s.model, s.tracked, tokenizer, docs)
    cosine = (queries @ documents.T) / (queries.norm(dim=1)[:, None] * documents.norm(dim=1)[None, :])
    result = GradientCosine().score(context, per_module=True)
    torch.testing.assert_close(result.scores, cosine, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.per_module.sum(0), result.scores, rtol=1e-10, atol=1e-12)
    assert result.document_ids == [d.id for d in docs] and result.query_ids == ["q0", "q1", "q2"]

    cka = GradientCosine(squared=True).score(context, per_module=True)
    # the paper's script, literally: linear CKA of the two 1×P gradient "representations", uncentred
    literal = torch.tensor([[float(torch.linalg.norm(x[None] @ y[None].T) ** 2 / (torch.linalg.norm(x[None] @ x[None].T) * torch.linalg.norm(y[None] @ y[None].T)))
                             for y in documents] for x in queries], dtype=torch.float64)
    torch.testing.assert_close(cka.scores, literal, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cka.scores, cosine**2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cka.per_module.sum(0), cka.scores, rtol=1e-10, atol=1e-12)


def test_multi_stage_takes_queries_from_the_query_stage_and_documents_from_the_document_stage(setup, tokenizer):
    pretrained, docs = setup
    finetuned = stage(build_tiny_model("gpt_neox", tokenizer, seed=1), tokenizer, batch_size=4, padding_side="right")
    context = ScoringContext(finetuned, pretrained, docs, QUERIES)
    queries = autograd_query_gradients(finetuned.model, finetuned.tracked, tokenizer, QUERIES)
    documents = autograd_document_gradients(pretrained.model, pretrained.tracked, tokenizer, docs)
    dot = build_gradient_dot()
    dot.fit(context)
    torch.testing.assert_close(dot.score(context).scores, queries @ documents.T, rtol=1e-9, atol=1e-12)
    cosine = (queries @ documents.T) / (queries.norm(dim=1)[:, None] * documents.norm(dim=1)[None, :])
    torch.testing.assert_close(GradientCosine().score(context).scores, cosine, rtol=1e-9, atol=1e-12)
    assert dot.name == "gradient-dot" and dot.hyperparameters()["preconditioner"] == {"type": "Identity"}


def direct_representation(model, ids, layer):
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    return hidden.mean(0)


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_representation_equals_mean_pooled_hidden_states(setup, tokenizer, layer):
    s, docs = setup
    finetuned = stage(build_tiny_model("gpt_neox", tokenizer, seed=2), tokenizer, batch_size=2, padding_side="right")
    context = ScoringContext(finetuned, s, docs, QUERIES)
    method = RepresentationSimilarity(layer)
    method.fit(context)
    result = method.score(context)
    with torch.no_grad():
        documents = torch.stack([direct_representation(s.model, tokenizer(d.text)["input_ids"], layer) for d in docs])
        queries = torch.stack([direct_representation(finetuned.model, e.input_ids, layer) for e in encode_queries(tokenizer, QUERIES, 64)])
    expected = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(documents, dim=1).T
    torch.testing.assert_close(result.scores, expected.double(), rtol=1e-9, atol=1e-12)
    assert result.scores.shape == (3, len(docs)) and result.document_ids == [d.id for d in docs]


def test_representation_layer_out_of_range_and_missing_breakdowns_are_refused(setup):
    s, docs = setup
    context = ScoringContext(s, s, docs, QUERIES)
    with pytest.raises(PretraceError, match="out of range"):
        RepresentationSimilarity(3).fit(context)  # 2 blocks: hidden states 0..2
    method = RepresentationSimilarity()
    method.fit(context)
    with pytest.raises(PretraceError, match="per-module"):
        method.score(context, per_module=True)
    with pytest.raises(PretraceError, match="per-token"):
        GradientCosine().score(context, per_token=True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def query_record(query):
    return {"id": query.id, "text": query.prompt} if query.completion is None else {"id": query.id, "prompt": query.prompt, "completion": query.completion}


def run_workflow(tmp_path, method, documents=None, **settings):
    """Score the tiny saved model's documents with `method`; check and return the score folder's contents."""
    model = tmp_path / "model"
    if not model.exists():
        save_tiny_model(model)
    documents = documents or [{"id": f"doc{i}", "text": d.text} for i, d in enumerate(random_documents(6, seed=3))]
    queries = write_jsonl(tmp_path / "queries.jsonl", [query_record(q) for q in QUERIES])
    train = write_jsonl(tmp_path / "train.jsonl", documents)
    out = tmp_path / f"scores-{method}"
    uses_model = METHODS[method].uses_model  # the text methods load no model
    stage = {"model": str(model)} if uses_model else {}
    result = score(from_flags(ScoreSettings, queries=str(queries), train=str(train), out=str(out), method=method, top_k=3, **stage, **settings),
                   ModelOptions(device="cpu", batch_size=4) if uses_model else ModelOptions())
    tensors, metadata = load_scores(out)
    assert tensors["scores"].shape == (len(QUERIES), len(documents)) == tuple(metadata["shape"])
    torch.testing.assert_close(tensors["scores"], result.scores.float())
    assert torch.isfinite(tensors["scores"]).all()
    assert metadata["method"] == method and metadata["document_ids"] == [d["id"] for d in documents]
    timings = metadata["timings"]
    assert timings["one_off_seconds"] >= 0 and timings["per_query_seconds"] > 0
    assert metadata["settings"]["method"]["name"] == method
    rows = [json.loads(line) for line in (out / "top_k.jsonl").read_text().splitlines()]
    assert [row["query_id"] for row in rows] == ["q0", "q1", "q2"] and all(len(row["documents"]) == 3 for row in rows)
    return tensors, metadata


@pytest.mark.parametrize("method,expected", [
    ("gradient-dot", {"alias_of": "identity"}),
    ("gradient-cosine", {"similarity": "cosine of gradients"}),
    ("cka", {"similarity": "squared cosine of gradients (linear CKA of single gradient vectors, uncentred)"}),
    ("representation", {"layer": 1}),
])
def test_similarity_methods_through_the_score_workflow(tmp_path, method, expected):
    tensors, metadata = run_workflow(tmp_path, method, **({"representation_layer": 1} if method == "representation" else {}))
    assert expected.items() <= metadata["hyperparameters"].items()
    expected = _workflow_reference(tmp_path / "model", method)
    torch.testing.assert_close(tensors["scores"].double(), expected, rtol=1e-4, atol=1e-6)  # the workflow ran in float32


def _workflow_reference(folder, method):
    """run_workflow's scores from scratch: hand-written losses of the saved model (float64) or its mean-pooled hidden states."""
    from transformers import AutoModelForCausalLM

    from dense import hand_query_gradients
    from tiny import train_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tokenizer = train_tokenizer()
    docs = random_documents(6, seed=3)
    if method == "representation":
        with torch.no_grad():
            d = torch.stack([direct_representation(model, tokenizer(x.text)["input_ids"], 1) for x in docs])
            q = torch.stack([direct_representation(model, tokenizer(x.prompt)["input_ids"] + tokenizer(x.completion or "", add_special_tokens=False)["input_ids"], 1)
                             for x in QUERIES])  # prompt and completion tokenized apart
        return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(d, dim=1).T
    tracked = select_modules(model)
    d = autograd_document_gradients(model, tracked, tokenizer, docs)
    q = torch.cat([hand_query_gradients(model, tracked, tokenizer, [(x.prompt, x.completion)]) if x.completion is not None
                   else autograd_document_gradients(model, tracked, tokenizer, [x.prompt]) for x in QUERIES])
    cosine = (q @ d.T) / (q.norm(dim=1)[:, None] * d.norm(dim=1)[None])
    return {"gradient-dot": q @ d.T, "gradient-cosine": cosine, "cka": cosine**2}[method]
