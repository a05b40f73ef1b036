"""The fact-tracing pipeline end to end on tiny models and a hand-made benchmark, and the answer probe."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from pretrace.bench.facts.benchmark import Fact, FactBenchmark, FactSplit, Sentence
from pretrace.bench.facts.metrics import recall_at_k, reciprocal_rank
from pretrace.bench.facts.probe import answer_ranks, top_k_accuracy
from pretrace.bench.facts.run import METHODS, FactTracingSettings, draw_queries, run_fact_tracing
from pretrace.bench.facts.templates import QuestionTemplate
from pretrace.data.batching import encode_queries
from pretrace.data.records import Query
from pretrace.errors import PretraceError
from tiny import build_tiny_model, save_tiny_model

TEXTS = [
    "paris is the capital of france .", "berlin is the capital of germany .", "rome is in italy .",
    "madrid is in spain .", "the cat sat on the mat .", "a dog ran in the park .", "the sun is hot .",
    "the moon is cold .", "birds can fly .", "fish can swim .", "paris is in france .", "berlin is in germany .",
    "rome is the capital of italy .", "madrid is the capital of spain .", "the dog sat in the sun .",
]
FACTS = [  # (relation, subject, object, evidence sentence ids)
    ("P36", "france", "paris", (0,)), ("P36", "germany", "berlin", (1,)), ("P36", "italy", "rome", (12,)),
    ("P36", "spain", "madrid", (13,)), ("P17", "paris", "france", (0, 10)), ("P17", "berlin", "germany", (1, 11)),
    ("P17", "rome", "italy", (2, 12)), ("P17", "madrid", "spain", (3, 13)),
]
RELATIONS = {"P36": QuestionTemplate("P36", "what is the capital of [X] ?"), "P17": QuestionTemplate("P17", "in which country is [X] ?")}


def tiny_benchmark() -> FactBenchmark:
    facts = [Fact(f"{r},{s},{o}", s, r, o, RELATIONS[r].ask(s), ids) for r, s, o, ids in FACTS]
    keys = {i: tuple(f.fact_id for f in facts if i in f.evidence_ids) for i in range(len(TEXTS))}
    sentences = [Sentence(i, text, keys[i]) for i, text in enumerate(TEXTS)]
    split = FactSplit(finetune=tuple(f.fact_id for f in facts if f.subject in ("france", "germany", "paris", "berlin")),
                      queries=tuple(f.fact_id for f in facts if f.subject in ("italy", "spain", "rome", "madrid")), seed=0, query_fraction=0.5)
    return FactBenchmark(sentences, facts, RELATIONS, split)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("facts-run")
    tiny_benchmark().write(root / "benchmark")
    model = save_tiny_model(root / "model", "llama", dtype=torch.float32)
    settings = FactTracingSettings(out=str(root / "out"), data="folder", benchmark=str(root / "benchmark"), model=str(model),
                                   queries=3, draws=3, candidates=3, random_candidates=4, sharing_candidates=2, top=6,
                                   finetune_facts=0, alpha=0.1, lr=1e-3, epochs=1, fit_sentences=6, preset="all", last_layers=1,
                                   batch_size=4, max_length=32, device="cpu")
    first = run_fact_tracing(settings)
    second = run_fact_tracing(settings)
    return root, settings, first, second


def test_results_hold_every_method_and_the_probe(finished_run):
    root, settings, results, _ = finished_run
    saved = json.loads((root / "out" / "results.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    for row in saved["methods"].values():
        assert len(row["mrr"]["per_draw"]) == settings.draws
        assert row["mrr"]["mean"] == pytest.approx(statistics.fmean(row["mrr"]["per_draw"]))  # the mean of the draws, not of the queries
        assert row["one_off_seconds"] >= 0 and row["per_query_seconds"] > 0
    assert set(saved["probe"]) == {"pretrained", "finetuned"}
    assert saved["tracked_modules"] and all(".1." in name for name in saved["tracked_modules"])  # the last of 2 blocks only
    assert (root / "out" / "finetuned" / "config.json").is_file()
    assert "| multi-stage EK-FAC |" in (root / "out" / "results.md").read_text()


def test_metrics_are_those_of_the_saved_rankings(finished_run):
    root, settings, results, _ = finished_run
    rows = {row["fact_id"]: row for row in map(json.loads, (root / "out" / "rankings.jsonl").read_text().splitlines())}
    pools = {row["fact_id"]: row for row in map(json.loads, (root / "out" / "pools.jsonl").read_text().splitlines())}
    for method in METHODS:
        for d, draw in enumerate(results["draws"]):
            expected_mrr = statistics.fmean(reciprocal_rank(rows[f]["rankings"][method], rows[f]["evidence_ids"], settings.top) for f in draw)
            expected_recall = statistics.fmean(recall_at_k(rows[f]["rankings"][method], rows[f]["evidence_ids"], 10) for f in draw)
            assert results["methods"][method]["mrr"]["per_draw"][d] == pytest.approx(expected_mrr)
            assert results["methods"][method]["recall@10"]["per_draw"][d] == pytest.approx(expected_recall)
    for fact_id, row in rows.items():
        for method in ("multi-stage-ekfac", "finetuned-ekfac", "gradient-dot", "embedding"):
            assert set(row["rankings"][method]) <= set(pools[fact_id]["ids"])  # pooled methods rank their pool only
            assert len(row["rankings"][method]) == min(settings.top, len(pools[fact_id]["ids"]))


def test_gradient_dot_scores_match_autograd(finished_run):
    """gradient-dot = ∇m(x; θ_ft) · ∇ℓ(z; θ_pt) over the tracked weights, recomputed with autograd."""
    from pretrace.modeling.loading import load_model, load_tokenizer
    from safetensors.torch import load_file

    root, settings, results, _ = finished_run
    scores = load_file(str(root / "out" / "scores" / "gradient.safetensors"))["gradient-dot"]
    meta = json.loads((root / "out" / "scores" / "gradient.json").read_text())
    tokenizer = load_tokenizer(root / "model")
    pretrained, finetuned = load_model(root / "model", "float32"), load_model(root / "out" / "finetuned", "float32")
    query_id, candidate_id = meta["query_ids"][0], meta["candidate_ids"][0]
    fact = tiny_benchmark().fact(query_id)
    encoded = next(encode_queries(tokenizer, [Query(fact.fact_id, fact.prompt, fact.completion)], 64))
    ids, mask = torch.tensor([encoded.input_ids]), torch.tensor(encoded.target_mask)
    loss_q = torch.nn.functional.cross_entropy(finetuned(ids).logits[0, :-1][mask[1:]], ids[0, 1:][mask[1:]], reduction="sum")
    text_ids = tokenizer(TEXTS[int(candidate_id)])["input_ids"]
    doc = torch.tensor([text_ids])
    loss_d = torch.nn.functional.cross_entropy(pretrained(doc).logits[0, :-1], doc[0, 1:], reduction="sum")
    present = dict(pretrained.named_parameters())
    names = [f"{n}.{kind}" for n in results["tracked_modules"] for kind in ("weight", "bias") if f"{n}.{kind}" in present]
    gq = torch.autograd.grad(loss_q, [dict(finetuned.named_parameters())[n] for n in names])
    gd = torch.autograd.grad(loss_d, [dict(pretrained.named_parameters())[n] for n in names])
    expected = sum((a * b).sum() for a, b in zip(gq, gd))
    assert float(scores[0, 0]) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_second_run_reuses_every_stage(finished_run):
    _, _, first, second = finished_run
    assert first["stages"]["finetune"] == "computed" and first["stages"]["gradient-scores"] == "computed"
    assert {stage for stage, how in second["stages"].items() if how == "computed"} == set()
    for method in METHODS:  # timings of the cheap uncached steps (BM25 search) may differ
        assert second["methods"][method]["mrr"] == first["methods"][method]["mrr"]
        assert second["methods"][method]["recall@10"] == first["methods"][method]["recall@10"]


def test_answer_ranks_match_a_hand_computation(tokenizer):
    model = build_tiny_model("llama", tokenizer, seed=3, dtype=torch.float32)
    queries = [Query("a", "paris is the capital", " of france"), Query("b", "the cat", " sat")]
    ranks = answer_ranks(model, tokenizer, queries, batch_size=2, progress=False)
    for query in queries:
        prompt = tokenizer(query.prompt)["input_ids"]
        completion = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        ids = prompt + completion
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        worst = 0
        for position in range(len(prompt) - 1, len(ids) - 1):
            row, gold = logits[position], ids[position + 1]
            worst = max(worst, int(sorted(row.tolist(), reverse=True).index(row[gold].item())) + 1)
        assert ranks[query.id] == worst
    assert top_k_accuracy([1, 3, 7, 2], 2) == 0.5


def test_dev_facts_are_the_fine_tuning_facts_left_out(tmp_path):
    from pretrace.bench.facts.run import query_set
    from pretrace.storage import write_jsonl

    benchmark = tiny_benchmark()
    used = benchmark.finetune_facts()[:3]
    write_jsonl(tmp_path / "finetune.jsonl", ({"id": f.fact_id, "prompt": f.prompt, "completion": f.completion} for f in used))
    dev = query_set(benchmark, "dev", tmp_path / "finetune.jsonl")
    assert [f.fact_id for f in dev] == [f.fact_id for f in benchmark.finetune_facts()[3:]]
    assert query_set(benchmark, "queries", tmp_path / "finetune.jsonl") == benchmark.query_facts()


def test_draws_and_settings_are_checked():
    facts = tiny_benchmark().query_facts()
    draws = draw_queries(facts, 3, 2, seed=0)
    assert [len(d) for d in draws] == [3, 3] and all(len(set(d)) == 3 for d in draws)
    assert draws == draw_queries(facts, 3, 2, seed=0)
    with pytest.raises(PretraceError, match="--data folder needs --benchmark"):
        FactTracingSettings(data="folder")
    with pytest.raises(PretraceError, match="--alpha"):
        FactTracingSettings(alpha=0.0)


def test_cli_prints_the_table_of_a_cached_run(finished_run, capsys):
    from pretrace.cli import main

    root, settings, _, _ = finished_run
    flags = ["--out", settings.out, "--data", "folder", "--benchmark", settings.benchmark, "--model", settings.model, "--queries", "3",
             "--draws", "3", "--candidates", "3", "--random-candidates", "4", "--sharing-candidates", "2", "--top", "6",
             "--finetune-facts", "0", "--alpha", "0.1", "--lr", "1e-3", "--epochs", "1", "--fit-sentences", "6", "--preset", "all",
             "--last-layers", "1", "--batch-size", "4", "--max-length", "32", "--device", "cpu"]
    assert main(["bench", "fact-tracing", *flags]) == 0
    printed = capsys.readouterr().out
    assert "| multi-stage EK-FAC |" in printed and "| finetuned |" in printed


def test_influence_scores_match_the_score_workflow_attributors(finished_run):
    """Multi-stage and fine-tuned-only rows equal pretrace's own attributors (query gradients x streamed documents)."""
    from safetensors.torch import load_file

    from pretrace.data.records import Document
    from pretrace.methods.base import ScoringContext
    from pretrace.methods.gradient import multi_stage, single_stage
    from pretrace.modeling.stage import ModelOptions, load_stage

    root, settings, results, _ = finished_run
    out = root / "out"
    scores = load_file(str(out / "scores" / "gradient.safetensors"))
    record = json.loads((out / "scores" / "gradient.json").read_text())
    benchmark = tiny_benchmark()
    queries = [Query(f, benchmark.fact(f).prompt, benchmark.fact(f).completion) for f in record["query_ids"]]
    documents = [Document(i, TEXTS[int(i)]) for i in record["candidate_ids"]]
    pattern = "^(" + "|".join(name.replace(".", r"\.") for name in results["tracked_modules"]) + ")$"
    options = ModelOptions(preset="all", modules=pattern, device="cpu", batch_size=4, max_length=32)
    pretrained, finetuned = load_stage(root / "model", options), load_stage(out / "finetuned", options)
    cases = {
        "multi-stage-ekfac": (multi_stage("ekfac", out / "factors-pretrained", out / "factors-finetuned", settings.alpha, None, settings.damping_factor, None), pretrained),
        "finetuned-ekfac": (single_stage("ekfac", out / "factors-finetuned", settings.alpha, 0.0), finetuned),
    }
    for method, (attributor, document_stage) in cases.items():
        context = ScoringContext(finetuned, document_stage, documents, queries)
        attributor.fit(context)
        expected = attributor.score(context).scores
        assert torch.allclose(scores[method], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())), method


def test_scores_rankings_and_metrics_equal_a_computation_from_scratch(finished_run):
    """End to end against an independent computation: each gradient method's whole score matrix from hand-written
    losses and dense matrices of the saved factors (float64), each query's ranking of its own pool and MRR and
    recall@10 per draw counted by hand from the evidence ids."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dense import autograd_document_gradients, dense_eigenbasis_matrix, hand_query_gradients
    from pretrace.curvature import Factors
    from pretrace.modeling.modules import select_modules

    root, settings, results, _ = finished_run
    out = root / "out"
    scores = load_file(str(out / "scores" / "gradient.safetensors"))
    record = json.loads((out / "scores" / "gradient.json").read_text())
    benchmark = tiny_benchmark()
    tokenizer = load_tokenizer_from(root / "model")
    pattern = "^(" + "|".join(name.replace(".", r"\.") for name in results["tracked_modules"]) + ")$"
    models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval() for name, folder in (("pt", root / "model"), ("ft", out / "finetuned"))}
    tracked = {name: select_modules(model, regex=pattern) for name, model in models.items()}
    pairs = [(benchmark.fact(f).prompt, benchmark.fact(f).completion) for f in record["query_ids"]]
    q = hand_query_gradients(models["ft"], tracked["ft"], tokenizer, pairs, max_length=settings.max_length)
    texts = [TEXTS[int(i)] for i in record["candidate_ids"]]
    d_pt = autograd_document_gradients(models["pt"], tracked["pt"], tokenizer, texts, max_length=settings.max_length)
    d_ft = autograd_document_gradients(models["ft"], tracked["ft"], tokenizer, texts, max_length=settings.max_length)

    def dense(folder, damping_of):
        factors = Factors.load(folder)
        blocks = []
        for t in tracked["pt"]:
            mf = factors.modules[t.name]
            blocks.append(dense_eigenbasis_matrix(mf.activation_eigenvectors, mf.gradient_eigenvectors, mf.lambda_, damping_of(mf)))
        return torch.block_diag(*blocks)

    alpha = settings.alpha
    h_pt = dense(out / "factors-pretrained", lambda mf: settings.damping_factor * float(mf.lambda_.double().mean()))
    h_ft = dense(out / "factors-finetuned", lambda mf: alpha)
    expected = {
        "gradient-dot": q @ d_pt.T,
        "finetuned-ekfac": q @ torch.linalg.solve(h_ft, d_ft.T),
        "multi-stage-ekfac": alpha * q @ torch.linalg.solve(h_ft, torch.linalg.solve(h_pt, d_pt.T)),
    }
    for method, reference in expected.items():  # pretrace ran the float32 model: float32 rounding, amplified by the damped inverses
        torch.testing.assert_close(scores[method].double(), reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()), msg=method)

    rankings = {row["fact_id"]: row for row in map(json.loads, (out / "rankings.jsonl").read_text().splitlines())}
    pools = {row["fact_id"]: row["ids"] for row in map(json.loads, (out / "pools.jsonl").read_text().splitlines())}
    column = {int(c): j for j, c in enumerate(record["candidate_ids"])}
    row_of = {f: r for r, f in enumerate(record["query_ids"])}
    for method in expected:
        for fact_id, pool in pools.items():
            values = {i: float(scores[method][row_of[fact_id], column[i]]) for i in pool}
            by_hand = sorted(pool, key=lambda i: (-values[i], i))[: settings.top]
            assert rankings[fact_id]["rankings"][method] == by_hand, (method, fact_id)
        for d, draw in enumerate(results["draws"]):
            mrr, recall = [], []
            for fact_id in draw:
                ranked, evidence = rankings[fact_id]["rankings"][method], set(benchmark.fact(fact_id).evidence_ids)
                hits = [position for position, i in enumerate(ranked[: settings.top], start=1) if i in evidence]
                mrr.append(1.0 / hits[0] if hits else 0.0)
                recall.append(sum(i in evidence for i in ranked[:10]) / len(evidence))
            assert results["methods"][method]["mrr"]["per_draw"][d] == pytest.approx(sum(mrr) / len(mrr), abs=1e-12)
            assert results["methods"][method]["recall@10"]["per_draw"][d] == pytest.approx(sum(recall) / len(recall), abs=1e-12)


def load_tokenizer_from(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
