"""Fact tracing over a whole corpus: every sentence of a seeded sample of the attribution set is a candidate, and
nothing is pre-selected by BM25.

Two-stage influence: every sample sentence's gradient on the pre-trained model is sketched once into a corpus store
(whitened by the pre-trained curvature, `pretrace.store`); each query's top K sentences by sketched multi-stage
score are re-ranked by exact multi-stage EK-FAC. It is compared, over the same queries with paired bootstrap
intervals, with BM25 ranking the same sample, with the sketched ranking alone, and with multi-stage EK-FAC in the
candidate-pool mode (each query's own pool of random, retrieved, evidence and target-sharing sentences).
"""

from __future__ import annotations

import random
from pathlib import Path


from pretrace.bench.facts.benchmark import Fact, FactBenchmark
from pretrace.bench.facts.metrics import recall_at_k, reciprocal_rank
from pretrace.bench.facts.scoring import WeightSet, attributor, score_candidates
from pretrace.bench.facts.stats import mean_interval, paired_difference
from pretrace.data.records import Document, Query
from pretrace.methods.base import ScoringContext
from pretrace.modeling.stage import Stage
from pretrace.scores.index import IndexSettings
from pretrace.stages import File
from pretrace.storage import write_jsonl
from pretrace.store import CorpusStore
from pretrace.workflows.index import index
from pretrace.workflows.recall import store_candidates

RECALL_K = 10


def corpus_sample(benchmark: FactBenchmark, facts: list[Fact], size: int, seed: int) -> list[int]:
    """Sorted sentence ids: every query's evidence, topped up by a seeded sample of the rest to `size` (0: all)."""
    total = len(benchmark.sentences)
    if size == 0 or size >= total:
        return list(range(total))
    evidence = {i for f in facts for i in f.evidence_ids}
    rest = [i for i in range(total) if i not in evidence]
    return sorted(evidence | set(random.Random(f"{seed}|full-corpus").sample(rest, max(0, size - len(evidence)))))


def full_corpus_results(run, benchmark: FactBenchmark, facts: list[Fact], pretrained: Stage, stages: dict[str, Stage],
                        pt_factors: Path, ft_factors: dict[str, Path], pool_values: dict[str, dict]) -> dict:
    """Per α: each method's MRR and recall@10 over the sample, the evidence recall of the store's K, and the paired
    differences of two-stage influence with BM25, with the sketch alone and with the pool mode (`pool_values`:
    the pool run's per-query values by α label and method)."""
    s, mode = run.settings, run.settings.corpus
    ids = corpus_sample(benchmark, facts, mode.corpus_sentences, s.seed)
    sample = run.result_path("full-corpus/sample.jsonl")
    sample.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(sample, ({"id": str(i), "text": benchmark.sentences[i].text} for i in ids))
    store = _store(run, sample, pretrained, pt_factors)
    queries = [Query(f.fact_id, f.prompt, f.completion) for f in facts]
    evidence = [f.evidence_ids for f in facts]
    bm25 = _bm25_rankings(benchmark, ids, facts, s.pool.top)
    results = {"sentences": len(ids), "attribution_sentences": len(benchmark.sentences), "bytes_per_document": store.meta["bytes_per_document"],
               "store_candidates": mode.store_candidates, "sketch_dim": mode.sketch_dim, "alphas": {}}
    rankings = []
    for label, stage in stages.items():
        alpha = float(label)
        made = attributor("multi-stage-ekfac", pt_factors, ft_factors[label], alpha, s.curvature.damping_factor, s.curvature.query_rank or None)
        context = ScoringContext(stage, pretrained, [], queries)
        made.fit(context)
        found, _ = store_candidates(store, made, context, mode.store_candidates)
        candidates = [[ids[j] for j in row] for row in found]
        exact = _exact_rankings(run, label, pretrained, stage, queries, candidates, benchmark, pt_factors, ft_factors[label])
        values = {"two-stage": _metrics(exact, evidence, s.pool.top), "sketch": _metrics(candidates, evidence, s.pool.top),
                  "bm25": _metrics(bm25, evidence, s.pool.top)}
        values["pool"] = {"rr": pool_values[label]["multi-stage-ekfac"]["pool_rr"], f"recall@{RECALL_K}": pool_values[label]["multi-stage-ekfac"][f"pool_recall@{RECALL_K}"]}
        store_recall = [len(set(c) & set(e)) / len(e) for c, e in zip(candidates, evidence)]
        rankings += [{"alpha": label, "fact_id": f.fact_id, "two_stage": e[:s.pool.top], "sketch": c[:s.pool.top], "bm25": b}
                     for f, e, c, b in zip(facts, exact, candidates, bm25)]
        results["alphas"][label] = {
            "methods": {m: {metric: mean_interval(v, s.bootstrap, s.seed) for metric, v in by.items()} for m, by in values.items()},
            "store_evidence_recall": mean_interval(store_recall, s.bootstrap, s.seed),
            "differences": [{"first": "two-stage", "second": other, **{metric: paired_difference(values["two-stage"][metric], values[other][metric], s.bootstrap, s.seed)
                                                                          for metric in ("rr", f"recall@{RECALL_K}")}} for other in ("bm25", "sketch", "pool")],
        }
    write_jsonl(run.result_path("full-corpus/rankings.jsonl"), rankings)
    return results


def _store(run, sample: Path, pretrained: Stage, pt_factors: Path) -> CorpusStore:
    """The sample's corpus store under the pre-trained model, whitened by its factors (a cached stage)."""
    mode, folder = run.settings.corpus, run.result_path("full-corpus/store")
    key = run.key(run.result_stage("full-corpus-store"), sample=File(sample), model=run.keys["pretrained"], factors=run.keys["factors-pretrained"],
                  options=pretrained.options, sketch_dim=mode.sketch_dim)
    if run.cache.stale(key, folder):
        index(pretrained, str(sample), folder, settings=IndexSettings(storage="sketch", sketch_dim=mode.sketch_dim, search="flat"),
              overwrite=True, factors=str(pt_factors))
        run.cache.record(key)
    return CorpusStore(folder)


def _bm25_rankings(benchmark: FactBenchmark, ids: list[int], facts: list[Fact], top: int) -> list[list[int]]:
    """BM25 over the sample alone, each query's top sentences (sentence ids)."""
    from pretrace.retrieval.bm25 import BM25Index

    index = BM25Index.open_or_build([benchmark.sentences[i].text for i in ids], None)
    found, _ = index.search([f.retrieval_query for f in facts], min(top, len(ids)))
    return [[ids[j] for j in row] for row in found.tolist()]


def _exact_rankings(run, label: str, pretrained: Stage, stage: Stage, queries: list[Query], candidates: list[list[int]],
                    benchmark: FactBenchmark, pt_factors: Path, ft_factors: Path) -> list[list[int]]:
    """Each query's store candidates ranked by exact multi-stage EK-FAC (their union scored once, cached by chunk)."""
    s = run.settings
    union = sorted({i for row in candidates for i in row})
    documents = [Document(str(i), benchmark.sentences[i].text) for i in union]
    made = attributor("multi-stage-ekfac", pt_factors, ft_factors, float(label), s.curvature.damping_factor, s.curvature.query_rank or None)
    sets = {f"multi-stage-ekfac@{label}": WeightSet(made, ScoringContext(stage, pretrained, [], queries))}
    inputs = {"queries": [(q.id, q.prompt, q.completion) for q in queries], "model": run.keys[f"finetune@{label}"], "pretrained": run.keys["pretrained"],
              "factors": [run.keys["factors-pretrained"], run.keys[f"factors-finetuned@{label}"]], "damping_factor": s.curvature.damping_factor,
              "query_rank": s.curvature.query_rank, "modules": [t.name for t in pretrained.tracked]}
    scores, _ = score_candidates(sets, pretrained, documents, s.compute.chunk, run.cache, run.result_stage(f"full-corpus-scores@{label}"), inputs,
                                 run.result_path(f"full-corpus/scores-{label}"), run.seconds)
    column = {i: c for c, i in enumerate(union)}
    exact = scores[f"multi-stage-ekfac@{label}"]
    return [sorted(row, key=lambda i: (-float(exact[q, column[i]]), i)) for q, row in enumerate(candidates)]


def _metrics(rankings: list[list[int]], evidence: list[tuple[int, ...]], top: int) -> dict[str, list[float]]:
    return {"rr": [reciprocal_rank(r, e, top) for r, e in zip(rankings, evidence)],
            f"recall@{RECALL_K}": [recall_at_k(r, e, RECALL_K) for r, e in zip(rankings, evidence)]}


def full_corpus_markdown(results: dict) -> list[str]:
    """The full-corpus table and its paired differences, per α."""
    from pretrace.bench.facts.stats import verdict

    interval = lambda m: f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
    signed = lambda m: f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"
    names = {"two-stage": "two-stage influence (store top K → exact multi-stage EK-FAC)", "sketch": "sketched multi-stage scores alone",
             "bm25": "BM25 over the same sample", "pool": "multi-stage EK-FAC, candidate-pool mode"}
    lines = [f"### Full corpus: {results['sentences']} sentences of {results['attribution_sentences']}, every one a candidate", ""]
    for label, block in results["alphas"].items():
        lines += [f"α = {label}; the store's K hold {interval(block['store_evidence_recall'])} of each query's evidence.", "",
                  f"| method | MRR | recall@{RECALL_K} |", "| --- | --- | --- |"]
        lines += [f"| {names[m]} | {interval(v['rr'])} | {interval(v[f'recall@{RECALL_K}'])} |" for m, v in block["methods"].items()]
        lines += ["", f"| two-stage − | Δ MRR | Δ recall@{RECALL_K} | reading |", "| --- | --- | --- | --- |"]
        lines += [f"| {names[d['second']]} | {signed(d['rr'])} | {signed(d[f'recall@{RECALL_K}'])} | {verdict(d['rr'], 'two-stage', d['second'])} |"
                  for d in block["differences"]]
        lines.append("")
    return lines
