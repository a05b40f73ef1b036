"""The fact-tracing pipeline end to end on tiny models and a hand-made benchmark, and the answer probe."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from pretrace.config import from_flags
from pretrace.bench.facts.benchmark import Fact, FactBenchmark, FactSplit, Sentence
from pretrace.bench.facts.metrics import recall_at_k, reciprocal_rank
from pretrace.bench.facts.probe import answer_ranks, top_k_accuracy
from pretrace.bench.facts.run import METHODS, FactTracingSettings, run_fact_tracing
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
CLOZE = {"P36": "the capital of [X] is [Y] .", "P17": "[X] is in [Y] ."}  # LAMA's relations.jsonl form


def write_cloze(path) -> str:
    path.write_text("".join(json.dumps({"relation": r, "template": t}) + "\n" for r, t in CLOZE.items()))
    return str(path)


def tiny_benchmark() -> FactBenchmark:
    facts = [Fact(f"{r},{s},{o}", s, r, o, RELATIONS[r].ask(s), ids) for r, s, o, ids in FACTS]
    keys = {i: tuple(f.fact_id for f in facts if i in f.evidence_ids) for i in range(len(TEXTS))}
    sentences = [Sentence(i, text, keys[i]) for i, text in enumerate(TEXTS)]
    split = FactSplit(finetune=tuple(f.fact_id for f in facts if f.subject in ("france", "germany", "paris", "berlin")),
                      queries=tuple(f.fact_id for f in facts if f.subject in ("italy", "spain", "rome", "madrid")), seed=0, query_fraction=0.5)
    return FactBenchmark(sentences, facts, RELATIONS, split)


SETTINGS = dict(candidates=3, random_candidates=4, sharing_candidates=2, top=10, finetune_facts=0, alphas="0.1,0.01", lr=1e-3, epochs=1,
                fit_sentences=6, preset="all", last_layers=1, batch_size=4, max_length=32, device="cpu", query_rank=0, chunk=5, bootstrap=500)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("facts-run")
    tiny_benchmark().write(root / "benchmark")
    model = save_tiny_model(root / "model", "llama", dtype=torch.float32)
    settings = from_flags(FactTracingSettings, out=str(root / "out"), data="folder", benchmark=str(root / "benchmark"), model=str(model),
                          cloze_templates=write_cloze(root / "cloze.jsonl"), **SETTINGS)
    first = run_fact_tracing(settings)
    second = run_fact_tracing(settings)
    return root, settings, first, second


def _scores(out, method: str, alpha: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """One method's `[Q, N]` scores at one α, from the saved chunks, with query and candidate ids."""
    from safetensors.torch import load_file

    folder = out / "scores" / ("pretrained" if method != "finetuned-ekfac" else f"finetuned-{alpha}")
    label = f"{method}@{alpha}"
    chunks = sorted(folder.glob("*.safetensors"))
    records = [json.loads(c.with_suffix(".json").read_text()) for c in chunks]
    scores = torch.cat([load_file(str(c))[label] for c in chunks], dim=1)
    return scores, records[0]["query_ids"][label], [i for r in records for i in r["candidate_ids"]]


def test_results_hold_every_method_at_every_alpha_with_intervals(finished_run):
    root, settings, results, _ = finished_run
    saved = json.loads((root / "out" / "results.json").read_text())
    queries = len(tiny_benchmark().query_facts())
    assert saved["sizes"]["queries"] == queries and set(saved["alphas"]) == {"0.1", "0.01"}
    for label, block in saved["alphas"].items():
        assert block["methods"].keys() == set(METHODS)
        for method, row in block["methods"].items():
            for metric in ("rr", "recall@10", "pool_rr", "pool_recall@10"):
                summary = row[metric]
                assert summary["low"] <= summary["mean"] <= summary["high"] and summary["n"] == queries
                assert summary["mean"] == pytest.approx(statistics.fmean(saved["per_query"][label][method][metric])) if metric in ("rr", "recall@10") else True
        assert len(block["differences"]) == len(METHODS) * (len(METHODS) - 1) // 2
        for d in block["differences"]:
            first, second = saved["per_query"][label][d["first"]]["rr"], saved["per_query"][label][d["second"]]["rr"]
            assert d["rr"]["mean"] == pytest.approx(statistics.fmean(a - b for a, b in zip(first, second)))
            assert (d["rr"]["wins"], d["rr"]["ties"], d["rr"]["losses"]) == (sum(a > b for a, b in zip(first, second)), sum(a == b for a, b in zip(first, second)),
                                                                             sum(a < b for a, b in zip(first, second)))
        assert set(block["probe"]) == {"pretrained", f"finetuned@{label}"}
        spectrum = block["finetuned_spectrum"]
        assert spectrum["min"] <= spectrum["quantiles"]["0.5"] <= spectrum["max"] and 0 <= spectrum["share_below_alpha"] <= 1
        assert (root / "out" / f"alpha-{label}" / "finetuned" / "config.json").is_file()
    assert saved["query_routes"]["multi-stage-ekfac@0.1"] == "eigenbasis" and saved["query_routes"]["gradient-dot@0.1"] == "tokens"
    assert saved["tracked_modules"] and all(".1." in name for name in saved["tracked_modules"])  # the last of 2 blocks only
    assert len(saved["across_alphas"]) == 1 and saved["peak_memory_gb"] > 0
    text = (root / "out" / "results.md").read_text()
    assert "| multi-stage EK-FAC |" in text and "| pre-trained-only EK-FAC |" in text and "### α = 0.01" in text


def test_metrics_are_those_of_the_saved_rankings(finished_run):
    root, settings, results, _ = finished_run
    rows = [json.loads(line) for line in (root / "out" / "rankings.jsonl").read_text().splitlines()]
    pools = {row["fact_id"]: row for row in map(json.loads, (root / "out" / "pools.jsonl").read_text().splitlines())}
    candidates = {int(row["id"]) for row in map(json.loads, (root / "out" / "candidates.jsonl").read_text().splitlines())}
    assert candidates == {i for pool in pools.values() for i in pool["ids"]}  # the shared set is the union of the pools
    order = results["query_ids"]
    benchmark = tiny_benchmark()
    assert len(rows) == len(results["alphas"]) * len(METHODS) * len(order)
    for row in rows:
        evidence = benchmark.fact(row["fact_id"]).evidence_ids
        position = order.index(row["fact_id"])
        per_query = results["per_query"][row["alpha"]][row["method"]]
        assert per_query["rr"][position] == reciprocal_rank(row["ranking"], evidence, settings.pool.top)
        assert per_query["recall@10"][position] == recall_at_k(row["ranking"], evidence, 10)
        assert set(row["ranking"]) <= candidates and len(row["ranking"]) == min(settings.pool.top, len(candidates))
        assert set(row["pool_ranking"]) <= set(pools[row["fact_id"]]["ids"])


def test_gradient_dot_scores_match_autograd(finished_run):
    """gradient-dot = ∇m(x; θ_ft) · ∇ℓ(z; θ_pt) over the tracked weights, recomputed with autograd."""
    from pretrace.modeling.loading import load_model, load_tokenizer

    root, settings, results, _ = finished_run
    scores, query_ids, candidate_ids = _scores(root / "out", "gradient-dot", "0.1")
    tokenizer = load_tokenizer(root / "model")
    pretrained, finetuned = load_model(root / "model", "float32"), load_model(root / "out" / "alpha-0.1" / "finetuned", "float32")
    fact = tiny_benchmark().fact(query_ids[0])
    encoded = next(encode_queries(tokenizer, [Query(fact.fact_id, fact.prompt, fact.completion)], 64))
    ids, mask = torch.tensor([encoded.input_ids]), torch.tensor(encoded.target_mask)
    loss_q = torch.nn.functional.cross_entropy(finetuned(ids).logits[0, :-1][mask[1:]], ids[0, 1:][mask[1:]], reduction="sum")
    text_ids = tokenizer(TEXTS[int(candidate_ids[0])])["input_ids"]
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
    assert first["stages"]["finetune@0.1"] == "computed" and first["stages"]["scores-pretrained/0000"] == "computed"
    assert {stage for stage, how in second["stages"].items() if how == "computed"} == set()
    assert second["per_query"] == first["per_query"] and second["alphas"] == first["alphas"]


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


def test_query_samples_and_settings_are_checked():
    from pretrace.bench.facts.run import sample_queries

    facts = tiny_benchmark().query_facts()
    assert sample_queries(facts, 0, seed=0) == facts and sample_queries(facts, 99, seed=0) == facts
    sample = sample_queries(facts, 3, seed=0)
    assert len(sample) == 3 and sample == sample_queries(facts, 3, seed=0) and all(f in facts for f in sample)
    with pytest.raises(PretraceError, match="--data folder needs --benchmark"):
        from_flags(FactTracingSettings, data="folder")
    for alphas in ("0", "1e-3,1e-3", "x", "", "nan", "inf"):
        with pytest.raises(PretraceError, match="--alphas"):
            from_flags(FactTracingSettings, alphas=alphas)
    assert from_flags(FactTracingSettings, paper_sizes=True).sizes().pool.candidates == 100


def test_cli_prints_the_table_of_a_cached_run(finished_run, capsys):
    from pretrace.cli import main

    root, settings, _, _ = finished_run
    flags = ["--out", settings.out, "--data", "folder", "--benchmark", settings.source.benchmark, "--model", settings.model,
             "--cloze-templates", settings.probing.cloze_templates]
    for name, value in SETTINGS.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    assert main(["bench", "fact-tracing", *flags]) == 0
    printed = capsys.readouterr().out
    assert "| multi-stage EK-FAC |" in printed and "| finetuned@0.1 | cloze |" in printed


def test_scores_rankings_and_metrics_equal_a_computation_from_scratch(finished_run):
    """End to end against an independent computation: each gradient method's whole score matrix at each α from
    hand-written losses and dense matrices of the saved factors (float64), each query's ranking of the shared
    candidate set, and reciprocal rank and recall@10 counted by hand from the evidence ids."""
    from transformers import AutoModelForCausalLM

    from dense import autograd_document_gradients, dense_eigenbasis_matrix, hand_query_gradients
    from pretrace.curvature import Factors
    from pretrace.modeling.modules import select_modules

    root, settings, results, _ = finished_run
    out = root / "out"
    benchmark = tiny_benchmark()
    tokenizer = load_tokenizer_from(root / "model")
    pattern = "^(" + "|".join(name.replace(".", r"\.") for name in results["tracked_modules"]) + ")$"
    load = lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()  # noqa: E731
    pretrained = load(root / "model")
    tracked = select_modules(pretrained, regex=pattern)
    _, query_ids, candidate_ids = _scores(out, "gradient-dot", "0.1")
    texts = [TEXTS[int(i)] for i in candidate_ids]
    pairs = [(benchmark.fact(f).prompt, benchmark.fact(f).completion) for f in query_ids]
    d_pt = autograd_document_gradients(pretrained, tracked, tokenizer, texts, max_length=settings.compute.max_length)

    def dense(folder, damping_of):
        factors = Factors.load(folder)
        blocks = []
        for t in tracked:
            mf = factors.modules[t.name]
            blocks.append(dense_eigenbasis_matrix(mf.activation_eigenvectors, mf.gradient_eigenvectors, mf.lambda_, damping_of(mf)))
        return torch.block_diag(*blocks)

    h_pt = dense(out / "factors-pretrained", lambda mf: settings.curvature.damping_factor * float(mf.lambda_.double().mean()))
    for label, block in results["alphas"].items():
        alpha = block["alpha"]
        finetuned = load(out / f"alpha-{label}" / "finetuned")
        tracked_ft = select_modules(finetuned, regex=pattern)
        q = hand_query_gradients(finetuned, tracked_ft, tokenizer, pairs, max_length=settings.compute.max_length)
        d_ft = autograd_document_gradients(finetuned, tracked_ft, tokenizer, texts, max_length=settings.compute.max_length)
        h_ft = dense(out / f"alpha-{label}" / "factors-finetuned", lambda mf: alpha)
        expected = {
            "gradient-dot": q @ d_pt.T,
            "pretrained-ekfac": q @ torch.linalg.solve(h_pt, d_pt.T),
            "finetuned-ekfac": q @ torch.linalg.solve(h_ft, d_ft.T),
            "multi-stage-ekfac": alpha * q @ torch.linalg.solve(h_ft, torch.linalg.solve(h_pt, d_pt.T)),
        }
        rankings = {(row["method"], row["fact_id"]): row["ranking"] for row in map(json.loads, (out / "rankings.jsonl").read_text().splitlines())
                    if row["alpha"] == label}
        for method, reference in expected.items():  # pretrace ran the float32 model: float32 rounding, amplified by the damped inverses
            scores, ids, columns = _scores(out, method, label)
            assert ids == query_ids and columns == candidate_ids
            torch.testing.assert_close(scores.double(), reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()), msg=f"{method}@{label}")
            for row, fact_id in enumerate(query_ids):
                values = {int(c): float(scores[row, j]) for j, c in enumerate(candidate_ids)}
                evidence = set(benchmark.fact(fact_id).evidence_ids)
                by_hand = sorted(values, key=lambda i: (-values[i], i in evidence, i))[: settings.pool.top]  # ties: evidence last
                assert rankings[(method, fact_id)] == by_hand, (method, fact_id)
                hits = [position for position, i in enumerate(by_hand, start=1) if i in evidence]
                position = results["query_ids"].index(fact_id)
                assert results["per_query"][label][method]["rr"][position] == pytest.approx(1.0 / hits[0] if hits else 0.0, abs=1e-12)
                assert results["per_query"][label][method]["recall@10"][position] == pytest.approx(sum(i in evidence for i in by_hand[:10]) / len(evidence), abs=1e-12)


def load_tokenizer_from(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_run_too_large_for_its_memory_cap_is_refused_before_any_work(tmp_path, capsys):
    from pretrace.cli import main

    tiny_benchmark().write(tmp_path / "benchmark")
    model = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    flags = ["--out", str(tmp_path / "out"), "--data", "folder", "--benchmark", str(tmp_path / "benchmark"), "--model", str(model),
             "--max-length", "32", "--memory-gb", "1e-9", "--device", "cpu", "--preset", "all"]
    assert main(["bench", "fact-tracing", *flags]) == 2
    error = capsys.readouterr().err
    assert "GB of prepared query weights" in error and "lower --query-rank" in error and "Traceback" not in error
    assert not (tmp_path / "out" / "alpha-0.001").exists()  # nothing fine-tuned
    assert main(["bench", "fact-tracing", *flags[:-4], "--alphas", "1e-3,-1"]) == 2
    assert "--alphas" in capsys.readouterr().err


def test_full_corpus_mode_ranks_the_store_candidates_exactly(tmp_path):
    """--full-corpus over every sentence: the store (wide enough to be exact up to float16) brings each query's top K
    by multi-stage score, their exact multi-stage scores order them, BM25 ranks the same sentences; every method's
    metrics are those of its saved ranking."""
    from pretrace.storage import read_jsonl_rows

    tiny_benchmark().write(tmp_path / "benchmark")
    model = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    settings = from_flags(FactTracingSettings, out=str(tmp_path / "out"), data="folder", benchmark=str(tmp_path / "benchmark"), model=str(model),
                          **{**SETTINGS, "alphas": "0.1"}, probe_styles="evidence", full_corpus=True, corpus_sentences=0, store_candidates=5, sketch_dim=48)
    results = run_fact_tracing(settings)["full_corpus"]
    assert results["sentences"] == len(TEXTS)
    block = results["alphas"]["0.1"]
    assert set(block["methods"]) == {"two-stage", "sketch", "bm25", "pool"}
    rows = read_jsonl_rows(tmp_path / "out" / "full-corpus" / "rankings.jsonl")
    evidence = {f"{r},{s},{o}": ids for r, s, o, ids in FACTS}
    for row in rows:
        assert sorted(row["two_stage"]) == sorted(row["sketch"]) and len(row["sketch"]) == 5
        assert row["two_stage"] == row["sketch"]  # k wide: the sketched order is the exact one
        assert len(row["bm25"]) == min(settings.pool.top, len(TEXTS))  # BM25 ranks the whole sample; its top are kept
    rr = [reciprocal_rank(row["two_stage"], evidence[row["fact_id"]], 10) for row in rows]
    assert block["methods"]["two-stage"]["rr"]["mean"] == pytest.approx(statistics.mean(rr))
    assert "Full corpus" in (tmp_path / "out" / "results.md").read_text()
