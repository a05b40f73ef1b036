"""Benchmark 2 (`pretrace bench fact-tracing`): which pre-training sentences taught a fine-tuned LLM a fact?

Stages, each cached in --out under a signature of its inputs (a finished stage is read back, a changed
input recomputes it and everything downstream, a killed run resumes):

1. `benchmark/`: the bundled benchmark, the real T-REx/LAMA one, or a folder written by FactBenchmark.write;
   `coverage.json`: how many of the facts' subjects and objects the corpus holds (see `coverage`), printed.
2. per α (`--alphas`): `alpha-<α>/finetuned/`, the pre-trained model fine-tuned with the proximity term
   α/2‖θ − θ_pt‖² on question/answer pairs of fine-tuning facts (subject-disjoint from the query facts), and
   `alpha-<α>/factors-finetuned/` (its EK-FAC on those pairs, completion tokens only);
   `factors-pretrained/`: EK-FAC of the pre-trained model on a sample of attribution sentences.
   Right after the fine-tunes, `<model>[-<style>].probe.json`: LAMA probing of the pre-trained and each fine-tuned
   model in three prompt styles, question, evidence and cloze (see `lama_probe`; a missing input is refused first).
3. `bm25/` and `candidates.jsonl`: one candidate set shared by every query, the union of each query's
   ground truth, BM25 top --candidates, up to --sharing-candidates target-sharing sentences and
   --random-candidates random ones. Every query is ranked against the whole set (and, as a secondary view,
   against its own pool of those parts, as in the paper).
4. `scores/`: each gradient method (see `scoring`) at each α, through pretrace's attributors and one scoring
   loop: one pass over the candidates on the pre-trained model scores multi-stage, pre-trained-only and
   gradient-dot weights of every α together, one pass per α on its fine-tuned model scores fine-tuned-only;
   plus each fine-tuned model's mean-pooled hidden states (embedding similarity) and BM25.
5. `rankings.jsonl`, `results.json`, `results.md`: per query and method, reciprocal rank and recall@10;
   each method's mean with a 95% bootstrap interval; for every pair of methods the paired difference over
   queries with its interval and win/tie/loss counts; H_ft's eigenvalue spectrum against α; the probe's top-k
   accuracy per model, style and protocol; the corpus coverage; costs.

Query facts (--query-set queries) are never used to choose settings: --query-set dev runs the same on
fine-tuning-split facts left out of fine-tuning, with outputs under --out/dev/.
"""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrace.bench.facts.benchmark import Fact, FactBenchmark, read_benchmark
from pretrace.bench.facts.bundled import build_bundled_benchmark
from pretrace.bench.facts.candidates import CandidatePool, candidate_pools
from pretrace.bench.facts.coverage import bundled_coverage, coverage_lines, coverage_markdown, folder_coverage, trex_lama_coverage
from pretrace.bench.facts.full_corpus import full_corpus_markdown, full_corpus_results
from pretrace.bench.facts.lama_probe import (PROBE_KS, StyleQueries, cloze_prompts, lama_evidence_prompts, one_token_answers, probe_notes,
                                             probe_results, probe_table, sentence_evidence_prompts, style_queries)
from pretrace.bench.facts.metrics import recall_at_k, reciprocal_rank
from pretrace.bench.facts.probe import answer_ranks
from pretrace.bench.facts.scoring import GRADIENT_METHODS, ON_PRETRAINED, WeightSet, attributor, score_candidates, weight_bytes
from pretrace.bench.facts.split import split_by_subject
from pretrace.bench.facts.stats import holm, mean_interval, paired_difference, verdict
from pretrace.bench.settings.fact_tracing import FactTracingSettings, alpha_label
from pretrace.config import to_dict
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.methods.base import ScoringContext
from pretrace.modeling.modules import find_blocks_container, select_modules
from pretrace.modeling.smollm import ensure_smollm2
from pretrace.modeling.stage import ModelOptions, Stage, load_stage
from pretrace.stages import File, Folder, StageCache, StageKey
from pretrace.storage import atomic_directory, output_folder, read_json, read_jsonl_rows, read_tensors, write_json, write_jsonl, write_tensors

METHODS = (*GRADIENT_METHODS, "embedding", "bm25")
LABELS = {
    "multi-stage-ekfac": "multi-stage EK-FAC",
    "pretrained-ekfac": "pre-trained-only EK-FAC",
    "finetuned-ekfac": "fine-tuned-only EK-FAC",
    "gradient-dot": "gradient dot product",
    "embedding": "embedding similarity",
    "bm25": "BM25",
}
RECALL_K = 10
SPECTRUM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

class _Run:
    """The stages of one run: its folder, settings and the stage cache keyed by each stage's inputs."""

    def __init__(self, settings: FactTracingSettings):
        self.settings, self.out = settings, Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out)
        self.keys: dict[str, StageKey] = {}
        self.seconds: dict[str, float] = {}

    def result_path(self, name: str) -> Path:
        """Where a query-set-dependent output goes: `name` for the query facts, `dev/name` for the dev set."""
        return self.settings.results_folder() / name

    def result_stage(self, name: str) -> str:
        """A query-set-dependent stage's name: the query facts' and the dev set's are cached side by side."""
        return name if self.settings.query_set == "queries" else f"dev/{name}"

    def key(self, name: str, **inputs) -> StageKey:
        self.keys[name] = self.cache.key(name, **inputs)
        return self.keys[name]

    def timed_stage(self, key: StageKey, outputs: tuple[Path, ...], timing: Path, compute, label: str | None = None):
        """`compute()` (its value returned) unless `key`'s outputs and `timing` are current (None returned); either
        way the stage's seconds, this run's or the saved ones, go to `self.seconds[label or key.name]`."""
        result = None
        if self.cache.stale(key, *outputs, timing):
            start = time.perf_counter()
            result = compute()
            timing.parent.mkdir(parents=True, exist_ok=True)
            write_json(timing, {"seconds": time.perf_counter() - start})
            self.cache.record(key)
        self.seconds[label or key.name] = float(read_json(timing)["seconds"])
        return result

    # -- 1. benchmark ----------------------------------------------------------------------------

    def benchmark(self) -> tuple[FactBenchmark, dict]:
        """The benchmark and its build counts (for T-REx/LAMA: facts and sentences dropped, printed)."""
        s, folder = self.settings, self.out / "benchmark"
        if s.source.data == "folder":
            self.key("benchmark", data=s.source.data, benchmark=Folder(s.source.benchmark))
            self.cache.statuses["benchmark"] = "read"
            benchmark, build = read_benchmark(s.source.benchmark), {}
        elif s.source.data == "bundled":
            key = self.key("benchmark", data=s.source.data, seed=s.seed)
            stale = self.cache.stale(key, folder)
            benchmark, build = build_bundled_benchmark(folder, seed=s.seed), {}
            if stale:
                self.cache.record(key)
        else:
            from pretrace.bench.facts.trex_lama import build_trex_lama_benchmark, lama_files, shipped_questions, trex_files

            questions = s.source.questions or shipped_questions()  # every file the build reads, keyed by its contents' sha256
            inputs = {"trex": [File(f) for f in trex_files(s.source.trex)], "lama": [File(f) for f in lama_files(s.source.lama)], "questions": File(questions)}
            key = self.key("benchmark", data=s.source.data, seed=s.seed, **inputs)
            if self.cache.stale(key, folder):
                benchmark, build = build_trex_lama_benchmark(s.source.trex, s.source.lama, questions)
                benchmark.split = split_by_subject(benchmark.facts, seed=s.seed)
                with atomic_directory(folder, "bench fact-tracing benchmark") as tmp:
                    benchmark.write(tmp)
                    write_json(tmp / "build.json", build)
                self.cache.record(key)
            benchmark, build = read_benchmark(folder), read_json(folder / "build.json")
            print(f"T-REx/LAMA: {build['facts']} facts kept, {build['facts_without_evidence']} of {build['lama_facts']} LAMA facts dropped "
                  f"for lack of an evidence sentence; {build['sentences']} sentences kept, {build['sentences_without_lama_fact']} "
                  "T-REx sentences dropped for lack of a LAMA triple")
        benchmark.finetune_facts()  # refuses a benchmark without a split
        return benchmark, build

    def coverage(self, benchmark: FactBenchmark) -> dict:
        """How many of the facts' entities the corpus holds (see `coverage`), once per benchmark; printed."""
        s, path = self.settings, self.out / "coverage.json"
        key = self.key("coverage", benchmark=self.keys["benchmark"])

        def compute() -> None:
            if s.source.data == "trex-lama":
                result = trex_lama_coverage(s.source.trex, s.source.lama)
            elif s.source.data == "bundled":
                result = bundled_coverage(benchmark)
            else:
                result = folder_coverage(benchmark, read_jsonl_rows(Path(s.source.benchmark) / "corpus.jsonl"))
            write_json(path, result)

        self.timed_stage(key, (path,), self.out / "coverage.seconds.json", compute)
        result = read_json(path)
        print("\n".join(coverage_lines(result)))
        return result

    # -- 2. fine-tuning and factors --------------------------------------------------------------

    def finetune_data(self, benchmark: FactBenchmark) -> Path:
        s, path = self.settings, self.out / "finetune.jsonl"
        key = self.key("finetune-data", benchmark=self.keys["benchmark"], finetune_facts=s.tuning.finetune_facts, seed=s.seed)
        if self.cache.stale(key, path):
            facts = benchmark.finetune_facts()
            if s.tuning.finetune_facts and len(facts) > s.tuning.finetune_facts:
                facts = random.Random(f"{s.seed}|finetune").sample(facts, s.tuning.finetune_facts)
            write_jsonl(path, ({"id": f.fact_id, "prompt": f.prompt, "completion": f.completion} for f in facts))
            self.cache.record(key)
        return path

    def finetuned_model(self, alpha: float, pretrained: Path, data: Path) -> Path:
        s, label = self.settings, alpha_label(alpha)
        folder, timing = self.out / f"alpha-{label}" / "finetuned", self.out / f"alpha-{label}" / "finetune.seconds.json"
        key = self.key(f"finetune@{label}", data=self.keys["finetune-data"], model=self.keys["pretrained"], alpha=alpha, lr=s.tuning.lr,
                       epochs=s.tuning.epochs, batch_size=s.tuning.finetune_batch_size, max_length=s.compute.max_length, seed=s.seed)
        from pretrace.training.finetune import FinetuneSettings, finetune

        self.timed_stage(key, (folder,), timing, lambda: finetune(FinetuneSettings(
            model=str(pretrained), data=str(data), out=str(folder), alpha=alpha, lr=s.tuning.lr, epochs=s.tuning.epochs,
            batch_size=s.tuning.finetune_batch_size, max_length=s.compute.max_length, seed=s.seed, device=s.compute.device, overwrite=True)))
        return folder

    def factors(self, name: str, folder: Path, model: Path, model_key: StageKey, data: Path, data_key: StageKey, options: ModelOptions) -> Path:
        from pretrace.workflows.fit import fit

        timing = folder.with_name(folder.name + ".seconds.json")
        key = self.key(name, model=model_key, data=data_key, options=to_dict(options))
        self.timed_stage(key, (folder,), timing, lambda: fit(model, data, folder, options))
        return folder

    def fit_sentences(self, benchmark: FactBenchmark) -> Path:
        path = self.out / "fit-pretrained.jsonl"
        key = self.key("fit-sentences", benchmark=self.keys["benchmark"], count=self.settings.curvature.fit_sentences, seed=self.settings.seed)
        if self.cache.stale(key, path):
            count = min(self.settings.curvature.fit_sentences, len(benchmark.sentences))
            chosen = sorted(random.Random(f"{self.settings.seed}|fit").sample(range(len(benchmark.sentences)), count))
            write_jsonl(path, ({"id": str(i), "text": benchmark.sentences[i].text} for i in chosen))
            self.cache.record(key)
        return path

    # -- 3. retrieval and candidates -------------------------------------------------------------

    def bm25(self, benchmark: FactBenchmark):
        from pretrace.retrieval.bm25 import BM25Index

        folder, timing = self.out / "bm25", self.out / "bm25.seconds.json"
        key = self.key("bm25", benchmark=self.keys["benchmark"])
        built = self.timed_stage(key, (folder,), timing, lambda: BM25Index.open_or_build(benchmark.texts, folder, show_progress=True), "bm25-index")
        return built if built is not None else BM25Index.open_or_build(benchmark.texts, folder)

    # -- probing (right after the fine-tunes) ----------------------------------------------------

    def evidence_prompts(self, benchmark: FactBenchmark, facts: list[Fact]) -> tuple[dict[str, str | None], str]:
        """Each fact's evidence-style prompt (None: none usable) and how they were made."""
        s = self.settings
        if s.source.data == "trex-lama":
            from pretrace.bench.facts.trex_lama import read_lama_evidences

            return (lama_evidence_prompts(facts, read_lama_evidences(s.source.lama)),
                    "LAMA's masked_sentence cut before [MASK] (the fact's first evidence with text before [MASK])")
        from pretrace.bench.facts.bundled_facts import bundled_fact_source

        names = bundled_fact_source().aliases if s.source.data == "bundled" else {}
        return (sentence_evidence_prompts(facts, benchmark.sentences, names),
                "the fact's first evidence sentence naming the object after other text, cut before that name")

    def cloze_templates(self) -> tuple[dict[str, str], str]:
        """Relation -> LAMA-style cloze template, and where they come from; refused where there are none."""
        from pretrace.bench.facts.bundled_facts import CLOZE_TEMPLATES
        from pretrace.bench.facts.trex_lama import lama_relations_path, read_lama_relations

        s = self.settings
        if s.probing.cloze_templates is None and s.source.data == "bundled":
            return dict(CLOZE_TEMPLATES), "the bundled cloze templates (LAMA's wording where LAMA has the relation)"
        if s.probing.cloze_templates is None and s.source.data == "folder":
            raise PretraceError("--data folder: no cloze templates; pass LAMA's relations.jsonl (or yours, in its form) with --cloze-templates, "
                                "or leave cloze out of --probe-styles.")
        path = Path(s.probing.cloze_templates) if s.probing.cloze_templates is not None else lama_relations_path(s.source.lama)
        if not path.is_file():
            raise PretraceError(f"{path}: no such file (LAMA's relations.jsonl, beside its TREx folder in data.zip); pass the cloze templates with "
                                "--cloze-templates, or leave cloze out of --probe-styles.")
        return {r: relation.template for r, relation in read_lama_relations(path).items()}, str(path)

    def probe(self, name: str, stage: Stage, model_key: StageKey, queries: list[Query]) -> dict[str, int]:
        path = self.result_path(f"{name}.probe.json")
        key = self.key(self.result_stage(f"probe-{name}"), model=model_key, queries=[(q.id, q.prompt, q.completion) for q in queries],
                       max_length=self.settings.compute.max_length)
        if self.cache.stale(key, path):
            start = time.perf_counter()
            ranks = answer_ranks(stage.model, stage.tokenizer, queries, self.settings.compute.batch_size, self.settings.compute.max_length)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"rank": "worst rank of any completion token under teacher forcing (1 = top token)", "ranks": ranks,
                              "seconds": time.perf_counter() - start})
            self.cache.record(key)
        saved = read_json(path)
        self.seconds[f"probe-{name}"] = float(saved["seconds"])
        return saved["ranks"]


def last_layers_pattern(model: torch.nn.Module, count: int) -> str | None:
    """A module-name pattern matching the last `count` transformer blocks (None: all blocks)."""
    prefix, blocks = find_blocks_container(model)
    if count == 0 or count >= len(blocks):
        return None
    kept = range(len(blocks) - count, len(blocks))
    return rf"^{re.escape(prefix)}\.({'|'.join(str(i) for i in kept)})\."


def query_set(benchmark: FactBenchmark, name: str, finetune_data: Path) -> list[Fact]:
    """The query facts, or the dev facts: fine-tuning-split facts the model was not fine-tuned on."""
    if name == "queries":
        return benchmark.query_facts()
    used = {row["id"] for row in read_jsonl_rows(finetune_data)}
    return [fact for fact in benchmark.finetune_facts() if fact.fact_id not in used]


def sample_queries(facts: list[Fact], count: int, seed: int) -> list[Fact]:
    """All `facts` (count 0 or at least their number), else a seeded sample of `count`, in benchmark order."""
    if not facts:
        raise PretraceError("no facts to query (with --query-set dev: every fine-tuning fact was fine-tuned on; lower --finetune-facts).")
    if not count or count >= len(facts):
        return list(facts)
    chosen = set(random.Random(f"{seed}|queries").sample(range(len(facts)), count))
    return [fact for position, fact in enumerate(facts) if position in chosen]


def shared_candidates(pools: list[CandidatePool], benchmark: FactBenchmark) -> list[int]:
    """The union of every query's pool, shortest sentences first (batches of similar length pad little)."""
    return sorted({i for pool in pools for i in pool.ids}, key=lambda i: (len(benchmark.sentences[i].text), i))


def rank_all(scores: torch.Tensor, sentence_ids: list[int], top: int, evidence: list[tuple[int, ...]]) -> list[list[int]]:
    """Per query row of `scores` `[Q, N]` (columns: `sentence_ids`), the ids by decreasing score, cut to `top`. Ties
    rank a query's evidence last (then smaller ids first): a method is never credited for a tie it did not break."""
    return [_ranked(dict(zip(sentence_ids, row.tolist())), set(correct), top) for row, correct in zip(scores.double(), evidence)]


def rank_pool(scores: torch.Tensor, pool: CandidatePool, column: dict[int, int], top: int, evidence: tuple[int, ...]) -> list[int]:
    """The pool's sentence ids by decreasing score (ties as in `rank_all`), cut to `top`."""
    values = scores[[column[i] for i in pool.ids]].double().tolist()
    return _ranked(dict(zip(pool.ids, values)), set(evidence), top)


def _ranked(values: dict[int, float], correct: set[int], top: int) -> list[int]:
    return sorted(values, key=lambda i: (-values[i], i in correct, i))[:top]


def spectrum(folder: Path, alpha: float | None = None) -> dict:
    """Quantiles of a curvature's EK-FAC eigenvalues Λ (all tracked modules pooled) and, against α, the share below it."""
    from pretrace.curvature import Factors

    factors = Factors.load(folder)
    values = np.concatenate([factors.modules[n].lambda_.double().flatten().numpy() for n in factors.module_names()])
    summary = {"count": int(values.size), "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
               "quantiles": {str(q): float(v) for q, v in zip(SPECTRUM_QUANTILES, np.quantile(values, SPECTRUM_QUANTILES))}}
    if alpha is not None:
        summary["share_below_alpha"] = float((values < alpha).mean())
    return summary


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def run_fact_tracing(settings: FactTracingSettings) -> dict:
    """Run (or resume) every stage in --out, checked and locked first like every command's output; return the
    results written to `<out>/results.json`."""
    inputs = {"--model": settings.model, "--trex": settings.source.trex, "--lama": settings.source.lama, "--questions": settings.source.questions,
              "--benchmark": settings.source.benchmark, "--cloze-templates": settings.probing.cloze_templates}
    require("bm25s", "sklearn", "sentence_transformers", *(("countryinfo", "pycountry", "gensim") if settings.source.data == "bundled" else ()),
            purpose="bench fact-tracing (BM25 and embedding baselines, and the bundled facts)")
    with output_folder(settings.out, False, inputs, command="bench fact-tracing", resume=True):
        return _run_fact_tracing(settings)


def _run_fact_tracing(settings: FactTracingSettings) -> dict:
    started, machine_at_start = time.perf_counter(), _machine()
    s = settings.sizes()
    run = _Run(s)
    out, alphas = run.out, s.alpha_values()
    benchmark, build = run.benchmark()
    pretrained_path = Path(s.model) if s.model else ensure_smollm2()
    run.key("pretrained", model=Folder(pretrained_path))
    data = run.finetune_data(benchmark)
    base = ModelOptions(preset=s.curvature.preset, modules=s.curvature.modules, device=s.compute.device, batch_size=s.compute.batch_size, max_length=s.compute.max_length)
    pretrained = load_stage(pretrained_path, base)
    options = base if s.curvature.modules is not None else replace(base, modules=last_layers_pattern(pretrained.model, s.curvature.last_layers))
    pretrained = replace(pretrained, options=options, tracked=select_modules(pretrained.model, options.preset, options.modules, options.attention_blocks))

    facts = sample_queries(query_set(benchmark, s.query_set, data), s.queries, s.seed)
    queries = [Query(f.fact_id, f.prompt, f.completion) for f in facts]
    _check_memory(s, pretrained, len(queries), len(alphas))  # before any fine-tuning or fitting
    styles = _probe_styles(run, benchmark, facts, queries, pretrained.tokenizer)  # a missing probe input, too
    coverage = run.coverage(benchmark)
    finetuned_paths = {alpha_label(a): run.finetuned_model(a, pretrained_path, data) for a in alphas}
    stages = {label: load_stage(path, options) for label, path in finetuned_paths.items()}
    probe_ranks = _probe_models(run, styles, pretrained, stages)
    lama_probe = probe_results(styles, probe_ranks, one_token_answers(pretrained.tokenizer, facts), _facts_label(s), len(facts), s.bootstrap, s.seed)
    pools, sentence_ids, bm25 = _candidates(run, benchmark, facts)
    candidates = [Document(str(i), benchmark.sentences[i].text) for i in sentence_ids]

    fit_data = run.fit_sentences(benchmark)
    pt_factors = run.factors("factors-pretrained", out / "factors-pretrained", pretrained_path, run.keys["pretrained"], fit_data, run.keys["fit-sentences"], options)
    ft_factors = {label: run.factors(f"factors-finetuned@{label}", out / f"alpha-{label}" / "factors-finetuned", finetuned_paths[label],
                                     run.keys[f"finetune@{label}"], data, run.keys["finetune-data"], options) for label in stages}
    scores, preparation = _gradient_scores(run, pretrained, stages, queries, candidates, pt_factors, ft_factors)
    for label, stage in stages.items():
        scores[label]["embedding"] = _embedding_scores(run, label, stage, queries, candidates)
        scores[label]["bm25"] = bm25
    ranks = {model: by_style["question"] for model, by_style in probe_ranks.items()}
    per_query = _per_query_metrics(run, scores, facts, pools, sentence_ids)
    full_corpus = full_corpus_results(run, benchmark, facts, pretrained, stages, pt_factors, ft_factors, per_query) if s.corpus.full_corpus else None

    results = {
        "benchmark": "fact-tracing",
        "settings": to_dict(s),
        "build": build,
        "models": {"pretrained": str(pretrained_path), **{f"finetuned@{label}": str(path) for label, path in finetuned_paths.items()}},
        "tracked_modules": [t.name for t in pretrained.tracked],
        "tracked_parameters": sum(t.num_parameters for t in pretrained.tracked),
        "sizes": {"queries": len(queries), "candidates": len(candidates), "attribution_sentences": len(benchmark.sentences),
                  "mean_pool_size": float(np.mean([len(p.ids) for p in pools])), "mean_ground_truth": float(np.mean([len(p.ground_truth) for p in pools]))},
        "pretrained_spectrum": spectrum(pt_factors),
        "alphas": {alpha_label(a): _alpha_results(s, a, per_query[alpha_label(a)], ft_factors[alpha_label(a)], finetuned_paths[alpha_label(a)], ranks, facts)
                   for a in alphas},
        "query_rank_error": {name: _quantiles(entry["relative_error"]) for name, entry in preparation.items()},
        "query_routes": {name: entry["route"] for name, entry in preparation.items()},
        "lama_probe": lama_probe,
        "coverage": coverage,
        **({"full_corpus": full_corpus} if full_corpus else {}),
    }
    if len(alphas) > 1:
        results["across_alphas"] = [
            {"method": "multi-stage-ekfac", "first": alpha_label(a), "second": alpha_label(b),
             **{metric: paired_difference(per_query[alpha_label(a)]["multi-stage-ekfac"][metric], per_query[alpha_label(b)]["multi-stage-ekfac"][metric], s.bootstrap, s.seed)
                for metric in ("rr", f"recall@{RECALL_K}")}}
            for a, b in combinations(alphas, 2)]
    results.update({
        "per_query": {label: {m: {"rr": v["rr"], f"recall@{RECALL_K}": v[f"recall@{RECALL_K}"]} for m, v in by.items()} for label, by in per_query.items()},
        "query_ids": [f.fact_id for f in facts],
        "stages": run.cache.statuses,
        "stage_digests": {name: key.digest for name, key in run.keys.items()},
        "seconds": {**run.seconds, "this_run": time.perf_counter() - started},
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # Linux: kilobytes
        "machine": {**machine_at_start, "load_average_at_end": list(os.getloadavg())},
    })
    write_json(run.result_path("results.json"), results)
    run.result_path("results.md").write_text(results_markdown(results), encoding="utf-8")
    return results


def _facts_label(s: FactTracingSettings) -> str:
    """Which facts are queried (and probed), in words."""
    name = "query facts" if s.query_set == "queries" else "dev facts (fine-tuning-split facts not fine-tuned on)"
    return f"{name}, a seeded sample of --queries {s.queries}" if s.queries else name


def _probe_styles(run: _Run, benchmark: FactBenchmark, facts: list[Fact], queries: list[Query], tokenizer) -> dict[str, StyleQueries]:
    """Every probe style's queries, made before any fine-tuning so that a style whose input is missing is refused first."""
    s = run.settings
    styles = {"question": StyleQueries("question", "the benchmark's question prompt, 'Question: <question>\\nAnswer:'", queries)}
    for style in s.probing.styles():
        if style == "evidence":
            prompts, how = run.evidence_prompts(benchmark, facts)
        else:
            templates, where = run.cloze_templates()
            prompts, how = cloze_prompts(facts, templates, where), f"the relation's cloze template from {where}, cut at [Y]"
        styles[style] = style_queries(style, how, facts, prompts, tokenizer, s.compute.max_length)
    return styles


def _probe_models(run: _Run, styles: dict[str, StyleQueries], pretrained: Stage, stages: dict[str, Stage]) -> dict[str, dict[str, dict[str, int]]]:
    """Model ("pretrained", "finetuned@<α>") -> style -> fact id -> answer rank, each a cached stage (the question
    style keeps the probe's original stage names, so runs from before the other styles reuse it)."""
    models = {"pretrained": (pretrained, run.keys["pretrained"], "pretrained"),
              **{f"finetuned@{label}": (stage, run.keys[f"finetune@{label}"], f"finetuned-{label}") for label, stage in stages.items()}}
    return {model: {style: run.probe(name if style == "question" else f"{name}-{style}", stage, key, sq.queries) for style, sq in styles.items()}
            for model, (stage, key, name) in models.items()}


def _check_memory(s: FactTracingSettings, pretrained: Stage, queries: int, alphas: int) -> None:
    """Refuse a run whose prepared query weights would not fit --memory-gb, naming the knobs that shrink them."""
    needed = weight_bytes(pretrained, queries, s.curvature.query_rank or None, alphas)
    if needed > s.compute.memory_gb * 1e9:
        raise PretraceError(f"{queries} queries over {sum(t.num_parameters for t in pretrained.tracked):,} tracked parameters need "
                            f"{needed / 1e9:.1f} GB of prepared query weights for {alphas} α (--memory-gb {s.compute.memory_gb}); lower --query-rank, "
                            "track fewer modules (--last-layers, --modules), score fewer --queries or --alphas, or raise --memory-gb.")


def _candidates(run: _Run, benchmark: FactBenchmark, facts: list[Fact]) -> tuple[list[CandidatePool], list[int], torch.Tensor]:
    """Each query's pool, the shared candidate set (sentence ids; written to candidates.jsonl) and BM25's `[Q, N]` scores on it."""
    s = run.settings
    index = run.bm25(benchmark)
    pools = candidate_pools(benchmark, facts, lambda text, k: index.search([text], k)[0][0].tolist(),
                            random_count=s.pool.random_candidates, bm25_count=s.pool.candidates, sharing_count=s.pool.sharing_candidates, seed=s.seed)
    write_jsonl(run.result_path("pools.jsonl"), (pool.to_dict() for pool in pools))
    sentence_ids = shared_candidates(pools, benchmark)
    write_jsonl(run.result_path("candidates.jsonl"), ({"id": str(i), "text": benchmark.sentences[i].text} for i in sentence_ids))
    start = time.perf_counter()
    bm25 = index.scores([f.retrieval_query for f in facts])[:, sentence_ids].double()
    run.seconds["bm25-search"] = time.perf_counter() - start
    return pools, sentence_ids, bm25


def _gradient_scores(run: _Run, pretrained: Stage, stages: dict[str, Stage], queries: list[Query], candidates: list[Document],
                     pt_factors: Path, ft_factors: dict[str, Path]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Every gradient method's `[Q, N]` scores per α (by α label, then method) and each weight set's preparation
    record: one pass per fine-tuned model (fine-tuned-only), then one pass on the pre-trained model for the rest."""
    s = run.settings
    rank = s.curvature.query_rank or None

    def weight_set(method: str, alpha: float, document_stage: Stage) -> WeightSet:
        label = alpha_label(alpha)
        made = attributor(method, pt_factors, ft_factors[label], alpha, s.curvature.damping_factor, rank)
        return WeightSet(made, ScoringContext(stages[label], document_stage, [], queries))

    scoring = dict(queries=[(q.id, q.prompt, q.completion) for q in queries], query_rank=rank, modules=[t.name for t in pretrained.tracked],
                   max_length=s.compute.max_length)
    scores: dict[str, dict[str, torch.Tensor]] = {label: {} for label in stages}
    preparation: dict[str, dict] = {}
    for alpha in s.alpha_values():  # fine-tuned-only: candidates' gradients on each fine-tuned model (one set; scored first, so its weights are freed early)
        label = alpha_label(alpha)
        sets = {f"finetuned-ekfac@{label}": weight_set("finetuned-ekfac", alpha, stages[label])}
        result, prepared = score_candidates(sets, stages[label], candidates, s.compute.chunk, run.cache, run.result_stage(f"scores-finetuned@{label}"),
                                            {**scoring, "alpha": alpha, "model": run.keys[f"finetune@{label}"], "factors": run.keys[f"factors-finetuned@{label}"]},
                                            run.result_path(f"scores/finetuned-{label}"), run.seconds)
        scores[label]["finetuned-ekfac"] = result[f"finetuned-ekfac@{label}"]
        preparation.update(prepared)
    sets = {f"{m}@{alpha_label(a)}": weight_set(m, a, pretrained) for a in s.alpha_values() for m in ON_PRETRAINED}
    result, prepared = score_candidates(sets, pretrained, candidates, s.compute.chunk, run.cache, run.result_stage("scores-pretrained"),
                                        {**scoring, "alphas": s.alpha_values(), "damping_factor": s.curvature.damping_factor,
                                         "models": [run.keys[f"finetune@{a}"] for a in stages],
                                         "factors": [run.keys["factors-pretrained"], *(run.keys[f"factors-finetuned@{a}"] for a in stages)]},
                                        run.result_path("scores/pretrained"), run.seconds)
    preparation.update(prepared)
    for name, values in result.items():
        method, label = name.split("@")
        scores[label][method] = values
    return scores, preparation


def _per_query_metrics(run: _Run, scores: dict[str, dict[str, torch.Tensor]], facts: list[Fact], pools: list[CandidatePool],
                       sentence_ids: list[int]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per α label and method, each query's reciprocal rank and recall@10 over the shared set and over its own
    pool; every ranking goes to rankings.jsonl."""
    top = run.settings.pool.top
    evidence = {f.fact_id: f.evidence_ids for f in facts}
    column = {i: c for c, i in enumerate(sentence_ids)}
    per_query: dict[str, dict[str, dict[str, list[float]]]] = {}
    ranking_rows = []
    for label, by_method in scores.items():
        per_query[label] = {}
        for method in METHODS:
            ranked = rank_all(by_method[method], sentence_ids, top, [evidence[f.fact_id] for f in facts])
            pooled = [rank_pool(by_method[method][row], pool, column, top, evidence[f.fact_id]) for row, (pool, f) in enumerate(zip(pools, facts))]
            per_query[label][method] = {
                "rr": [reciprocal_rank(r, evidence[f.fact_id], top) for r, f in zip(ranked, facts)],
                f"recall@{RECALL_K}": [recall_at_k(r, evidence[f.fact_id], RECALL_K) for r, f in zip(ranked, facts)],
                "pool_rr": [reciprocal_rank(r, evidence[f.fact_id], top) for r, f in zip(pooled, facts)],
                f"pool_recall@{RECALL_K}": [recall_at_k(r, evidence[f.fact_id], RECALL_K) for r, f in zip(pooled, facts)],
            }
            ranking_rows.extend({"alpha": label, "method": method, "fact_id": f.fact_id, "ranking": r, "pool_ranking": p} for r, p, f in zip(ranked, pooled, facts))
    write_jsonl(run.result_path("rankings.jsonl"), ranking_rows)
    return per_query


def _alpha_results(s: FactTracingSettings, alpha: float, values: dict, ft_factors: Path, finetuned: Path, ranks: dict, facts: list[Fact]) -> dict:
    """One α's results: H_ft's spectrum, the fine-tune record, probe accuracy, each method's means and every pair's
    paired difference (significance corrected over this α's pairs, per metric, by Holm)."""
    label = alpha_label(alpha)
    record = finetuned / "pretrace_finetune.json"
    entry = {
        "alpha": alpha,
        "finetuned_spectrum": spectrum(ft_factors, alpha),
        "finetune_record": read_json(record) if record.is_file() else None,
        "probe": {model: {f"top{k}": mean_interval([float(model_ranks[f.fact_id] <= k) for f in facts], s.bootstrap, s.seed) for k in PROBE_KS}
                  for model, model_ranks in ranks.items() if model in ("pretrained", f"finetuned@{label}")},
        "methods": {m: {"label": LABELS[m], **{metric: mean_interval(v, s.bootstrap, s.seed) for metric, v in values[m].items()}} for m in METHODS},
        "differences": [_difference(values, first, second, s) for first, second in combinations(METHODS, 2)],
    }
    for metric in ("rr", f"recall@{RECALL_K}"):
        holm([d[metric] for d in entry["differences"]])
    return entry


def _difference(values: dict, first: str, second: str, s: FactTracingSettings) -> dict:
    return {"first": first, "second": second, **{metric: paired_difference(values[first][metric], values[second][metric], s.bootstrap, s.seed)
                                                 for metric in ("rr", f"recall@{RECALL_K}")}}


def _quantiles(errors: list[float] | None) -> dict | None:
    if not errors:
        return None
    values = np.asarray(errors)
    return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9)), "max": float(values.max())}


def _embedding_scores(run: _Run, label: str, finetuned: Stage, queries: list[Query], candidates: list[Document]) -> torch.Tensor:
    """Cosine of mean-pooled last hidden states of the fine-tuned model: query prompt + answer vs candidate."""
    from pretrace.baselines.similarity import pooled_hidden_states

    path = run.result_path(f"scores/embedding-{label}.safetensors")
    key = run.key(run.result_stage(f"embedding@{label}"), finetuned=run.keys[f"finetune@{label}"], queries=[(q.id, q.prompt, q.completion) for q in queries],
                  candidates=[(c.id, c.text) for c in candidates], max_length=run.settings.compute.max_length)

    def compute() -> torch.Tensor:
        _, documents = pooled_hidden_states(finetuned, finetuned.document_batches(candidates)(), -1, finetuned.document_batch_count(candidates), "candidate representations")
        _, vectors = pooled_hidden_states(finetuned, finetuned.query_batches(queries), -1, desc="query representations")
        scores = (F.normalize(vectors, dim=1) @ F.normalize(documents, dim=1).T).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(path, {"scores": scores})
        return scores

    computed = run.timed_stage(key, (path,), path.with_name(f"embedding-{label}.seconds.json"), compute, f"embedding@{label}")
    return computed if computed is not None else read_tensors(path)["scores"]


def _reading(difference: dict, first: str, second: str) -> str:
    """Both metrics' verdicts in one phrase when they agree, else each named."""
    mrr, recall = verdict(difference["rr"], first, second), verdict(difference[f"recall@{RECALL_K}"], first, second)
    return mrr if mrr == recall else f"MRR: {mrr}; recall@{RECALL_K}: {recall}"


def _interval(summary: dict) -> str:
    return f"{summary['mean']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def _signed(summary: dict) -> str:
    return f"{summary['mean']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"


def results_markdown(results: dict) -> str:
    """Per α: each method's MRR and recall@10 with 95% intervals, every pair's paired difference in words, H_ft's spectrum and the
    LAMA probe in every style; then how each style asked, and the corpus coverage of the facts' entities."""
    sizes, machine, seconds = results["sizes"], results["machine"], results["seconds"]
    recall = f"recall@{RECALL_K}"
    lines = [f"Fact tracing: {sizes['queries']} query facts, each ranked against one shared set of {sizes['candidates']} candidate sentences "
             f"(of {sizes['attribution_sentences']}); means over queries with 95% bootstrap intervals.", ""]
    for label, block in results["alphas"].items():
        spectrum_ft = block["finetuned_spectrum"]
        q = spectrum_ft["quantiles"]
        lines += [f"### α = {label}", "",
                  f"H_ft eigenvalues: median {q['0.5']:.2g}, 90% {q['0.9']:.2g}, 99% {q['0.99']:.2g}, mean {spectrum_ft['mean']:.2g}; "
                  f"{100 * spectrum_ft['share_below_alpha']:.1f}% of them lie below α.", "",
                  f"| method | MRR | {recall} | MRR, per-query pools | {recall}, per-query pools |", "| --- | --- | --- | --- | --- |"]
        for row in block["methods"].values():
            lines.append(f"| {row['label']} | {_interval(row['rr'])} | {_interval(row[recall])} | {_interval(row['pool_rr'])} | {_interval(row[f'pool_{recall}'])} |")
        pairs = len(block["differences"])
        lines += ["", f"Paired differences over the {sizes['queries']} queries (uncorrected 95% intervals; a difference is called only when its "
                      f"bootstrap p-value stays below 0.05 after Holm's correction over the {pairs} pairs of this α, per metric):", "",
                  f"| first − second | Δ MRR | W/T/L | Δ {recall} | W/T/L | reading |", "| --- | --- | --- | --- | --- | --- |"]
        for d in block["differences"]:
            first, second = LABELS[d["first"]], LABELS[d["second"]]
            lines.append(f"| {first} − {second} | {_signed(d['rr'])} | {d['rr']['wins']}/{d['rr']['ties']}/{d['rr']['losses']} | {_signed(d[recall])} | "
                         f"{d[recall]['wins']}/{d[recall]['ties']}/{d[recall]['losses']} | {_reading(d, first, second)} |")
        lines += ["", *probe_table(results["lama_probe"], ["pretrained", f"finetuned@{label}"])]
    lines += [*probe_notes(results["lama_probe"]), *coverage_markdown(results["coverage"])]
    if "full_corpus" in results:
        lines += full_corpus_markdown(results["full_corpus"])
    for d in results.get("across_alphas", []):
        lines.append(f"Multi-stage EK-FAC at α = {d['first']} − at α = {d['second']}: Δ MRR {_signed(d['rr'])} (W/T/L {d['rr']['wins']}/{d['rr']['ties']}/{d['rr']['losses']}), "
                     f"Δ {recall} {_signed(d[recall])}.")
    lines += ["", f"Machine: {machine['platform']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch threads, load average "
                  f"{machine['load_average'][0]:.1f} at start and {machine['load_average_at_end'][0]:.1f} at end; all stages "
                  f"{sum(v for k, v in seconds.items() if k != 'this_run') / 60:.1f} min, this run {seconds['this_run'] / 60:.1f} min, "
                  f"peak memory {results['peak_memory_gb']:.1f} GB.", ""]
    return "\n".join(lines)
