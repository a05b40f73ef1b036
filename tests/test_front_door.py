"""The front door as a notebook uses it: a model built in memory, records as Python lists, no folder anywhere; the
same numbers as the commands over files; the same refusals."""

from __future__ import annotations

import os

import pytest
import torch

import pretrace
from tiny import SENTENCES, build_tiny_model, train_tokenizer, write_jsonl

QUERIES = [{"id": "q0", "prompt": "paris is the capital of", "completion": " france ."},
           {"id": "q1", "prompt": "birds can", "completion": " fly ."}]


@pytest.fixture()
def notebook(tmp_path, monkeypatch):
    """A working directory that must stay empty, a tiny model and its tokenizer, held in memory."""
    monkeypatch.chdir(tmp_path)
    tokenizer = train_tokenizer()
    return tmp_path, build_tiny_model("gpt_neox", tokenizer), tokenizer


def test_fit_and_score_in_memory_write_nothing_and_match_the_commands_over_files(notebook):
    folder, model, tokenizer = notebook
    documents = [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)]
    factors = pretrace.fit(model, documents, tokenizer=tokenizer, progress=False)
    result = pretrace.score(QUERIES, documents, model=model, factors=factors, tokenizer=tokenizer, top_k=3, progress=False)
    assert os.listdir(folder) == []
    assert result.query_ids == ["q0", "q1"] and result.document_ids == [f"d{i}" for i in range(len(SENTENCES))]
    assert result.scores.dtype == torch.float64 and result.scores.shape == (2, len(SENTENCES))

    (folder / "files").mkdir()
    model.save_pretrained(folder / "files" / "model")
    tokenizer.save_pretrained(folder / "files" / "model")
    train = write_jsonl(folder / "files" / "train.jsonl", documents)
    queries = write_jsonl(folder / "files" / "q.jsonl", QUERIES)
    on_disk = pretrace.fit(folder / "files" / "model", train, folder / "files" / "factors", dtype="float64", progress=False)
    for name, module in factors.modules.items():
        assert torch.equal(module.gradient_eigenvalues, on_disk.modules[name].gradient_eigenvalues)
        assert torch.equal(module.lambda_, on_disk.modules[name].lambda_)
    written = pretrace.score(queries, train, model=str(folder / "files" / "model"), factors=str(folder / "files" / "factors"),
                             out=folder / "files" / "scores", top_k=3, dtype="float64", progress=False)
    assert torch.equal(result.scores, written.scores)
    assert torch.equal(pretrace.load_scores(folder / "files" / "scores").scores, written.scores.float().double())

    best = result.top(3)
    assert list(best) == ["q0", "q1"] and len(best["q0"]) == 3
    ranked = torch.sort(result.scores[0], descending=True, stable=True).indices[:3].tolist()
    assert [doc for doc, _ in best["q0"]] == [result.document_ids[i] for i in ranked]
    first = result.document_ids.index(best["q0"][0][0])
    explanation = result.explanations[(0, first)]
    assert float(explanation.token_scores.sum()) == pytest.approx(float(result.scores[0, first]), rel=1e-6, abs=1e-12)
    frame = result.to_pandas("wide")
    assert frame.loc["q1", best["q1"][0][0]] == pytest.approx(best["q1"][0][1])
    long = result.to_pandas()
    assert list(long.columns) == ["query_id", "document_id", "score", "rank"] and len(long) == result.scores.numel()
    first_three = long[(long.query_id == "q1") & (long["rank"] <= 3)]
    assert list(first_three.document_id) == [doc for doc, _ in best["q1"]]
    assert first_three.score.tolist() == pytest.approx([value for _, value in best["q1"]])
    assert long.set_index(["query_id", "document_id"]).score.unstack().loc["q0", best["q0"][0][0]] == pytest.approx(best["q0"][0][1])


def test_every_kind_of_in_memory_records_gives_the_same_scores(notebook):
    datasets = pytest.importorskip("datasets")
    _, model, tokenizer = notebook
    factors = pretrace.fit(model, list(SENTENCES), tokenizer=tokenizer, progress=False)
    kinds = {
        "strings": list(SENTENCES),
        "dicts": [{"text": s} for s in SENTENCES],
        "documents": [pretrace.Document(str(i), s) for i, s in enumerate(SENTENCES)],
        "dataset": datasets.Dataset.from_dict({"text": list(SENTENCES)}),
    }
    queries = [pretrace.Query("q0", "paris is the capital of", " france .")]
    results = {kind: pretrace.score(queries, train, model=model, factors=factors, tokenizer=tokenizer, explain=False, progress=False)
               for kind, train in kinds.items()}
    for kind, result in results.items():
        assert result.document_ids == [str(i) for i in range(len(SENTENCES))], kind
        assert torch.equal(result.scores, results["strings"].scores), kind


def test_multi_stage_in_memory_from_finetune_reads_its_alpha_and_keeps_the_pretrained_model(notebook):
    folder, model, tokenizer = notebook
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pairs = [{"prompt": q["prompt"], "completion": q["completion"]} for q in QUERIES] * 2
    finetuned = pretrace.finetune(model, pairs, alpha=0.5, tokenizer=tokenizer, epochs=1, batch_size=2, progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # θ_pt untouched
    assert finetuned.pretrace_finetune["alpha"] == 0.5 and finetuned.pretrace_finetune["data"] == "<in memory>"
    assert any(not torch.equal(p, before[name]) for name, p in finetuned.named_parameters())

    pretrained_factors = pretrace.fit(model, list(SENTENCES), tokenizer=tokenizer, progress=False)
    finetuned_factors = pretrace.fit(finetuned, pairs, tokenizer=tokenizer, progress=False)
    result = pretrace.score(QUERIES, list(SENTENCES), pretrained=model, finetuned=finetuned, pretrained_factors=pretrained_factors,
                            finetuned_factors=finetuned_factors, tokenizer=tokenizer, explain=False, progress=False)
    explicit = pretrace.score(QUERIES, list(SENTENCES), pretrained=model, finetuned=finetuned, pretrained_factors=pretrained_factors,
                              finetuned_factors=finetuned_factors, tokenizer=tokenizer, alpha=0.5, explain=False, progress=False)
    assert torch.equal(result.scores, explicit.scores) and bool(result.scores.any())
    assert os.listdir(folder) == []


def test_a_custom_task_changes_the_query_measurement_only(notebook):
    _, model, tokenizer = notebook

    class DoubledLoss(pretrace.LanguageModelingTask):
        def measurement(self, model, batch):
            return 2 * super().measurement(model, batch)

    factors = pretrace.fit(model, list(SENTENCES), tokenizer=tokenizer, progress=False)
    plain = pretrace.score(QUERIES, list(SENTENCES), model=model, factors=factors, tokenizer=tokenizer, explain=False, progress=False)
    doubled = pretrace.score(QUERIES, list(SENTENCES), model=model, factors=factors, tokenizer=tokenizer, task=DoubledLoss(),
                             explain=False, progress=False)
    torch.testing.assert_close(doubled.scores, 2 * plain.scores, rtol=1e-9, atol=0)


@pytest.mark.parametrize("call, error, needle", [
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, factors=f, tokenizer=t, top_kk=3), TypeError, "unknown setting(s) 'top_kk'"),
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, factors=f), TypeError, "needs its tokenizer"),
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, factors=f, tokenizer=t, device="cpu"), pretrace.PretraceError, "already loaded"),
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, factors=f, tokenizer=t, scores_on_disk=True), pretrace.PretraceError, "without an output folder"),
    (lambda m, t, f: pretrace.score(QUERIES, iter(SENTENCES), model=m, factors=f, tokenizer=t), TypeError, "a generator is read once"),
    (lambda m, t, f: pretrace.score(QUERIES, [3.5], model=m, factors=f, tokenizer=t), pretrace.PretraceError, "item 0: expected a dict"),
    (lambda m, t, f: pretrace.score(QUERIES, [], model=m, factors=f, tokenizer=t), pretrace.PretraceError, "the list is empty"),
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, tokenizer=t, method="bm25"), pretrace.PretraceError, "--model"),
    (lambda m, t, f: pretrace.score(QUERIES, list(SENTENCES), model=m, factors=f, tokenizer=t, method="bm25", task=pretrace.LanguageModelingTask()),
     pretrace.PretraceError, "--factors"),
    (lambda m, t, f: pretrace.fit(m, list(SENTENCES), tokenizer=t, overwrite=True), pretrace.PretraceError, "without an output folder"),
])
def test_refusals_come_before_any_work(notebook, call, error, needle):
    folder, model, tokenizer = notebook
    factors = pretrace.fit(model, list(SENTENCES), tokenizer=tokenizer, progress=False)
    with pytest.raises(error) as raised:
        call(model, tokenizer, factors)
    assert needle in str(raised.value)
    assert os.listdir(folder) == []


def test_factors_of_another_model_are_refused_in_memory_too(notebook):
    _, model, tokenizer = notebook
    other = build_tiny_model("gpt_neox", tokenizer, seed=1)
    factors = pretrace.fit(other, list(SENTENCES), tokenizer=tokenizer, progress=False)
    with pytest.raises(pretrace.PretraceError, match="fitted on a different model than --model <in memory>"):
        pretrace.score(QUERIES, list(SENTENCES), model=model, factors=factors, tokenizer=tokenizer)


def test_an_index_built_from_objects_scores_like_the_pass_and_keeps_self_influence(notebook):
    folder, model, tokenizer = notebook
    documents = list(SENTENCES)
    factors = pretrace.fit(model, documents, tokenizer=tokenizer, progress=False)
    meta = pretrace.index(model, documents, folder / "index", tokenizer=tokenizer, progress=False)
    assert meta["document_ids"] == [str(i) for i in range(len(SENTENCES))]
    streamed = pretrace.score(QUERIES, documents, model=model, factors=factors, tokenizer=tokenizer, self_influence=True, explain=False, progress=False)
    indexed = pretrace.score(QUERIES, documents, model=model, factors=factors, tokenizer=tokenizer, index=str(folder / "index"),
                             self_influence=True, explain=False, progress=False)
    torch.testing.assert_close(indexed.scores, streamed.scores, rtol=1e-9, atol=1e-12)
    assert indexed.self_influence is not None  # --index with --self-influence once dropped it in silence
    torch.testing.assert_close(indexed.self_influence, streamed.self_influence, rtol=0, atol=0)
    with pytest.raises(pretrace.PretraceError, match="built on other documents"):
        pretrace.score(QUERIES, documents[:-1], model=model, factors=factors, tokenizer=tokenizer, index=str(folder / "index"))
