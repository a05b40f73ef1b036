"""`pretrace trace`: which pre-training documents made a fine-tuned model give its answers, as a report to read.

Corpus-scale influence the way the paper's case study does it: a cheap retriever (sentence-embedding kNN or
BM25) narrows the corpus to K candidates per query, multi-stage EK-FAC influence scores only those (their
union once, each query ranked among its own candidates), and the top documents come back with per-token and
per-layer contributions in `results.jsonl`, `report.html` and PNG plots.

Every stage writes its output atomically into --out and records what it was computed from in `stages.json`,
so an interrupted or repeated run redoes only the stages whose inputs changed (factor fits and the embedding
index also resume mid-way on their own).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrace.config import require_instance, to_dict
from pretrace.curvature import FitSettings
from pretrace.data.records import DEFAULT_FIELDS, Document, Fields, Query, UniqueIds, encodable, iter_documents, iter_records
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar
from pretrace.workflows.registry import make_attributor
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.folders import check_model_dir
from pretrace.modeling.loading import check_model_tokenizer, load_model, load_tokenizer
from pretrace.retrieval import make_retriever, retrieval_recall
from pretrace.scores.io import load_scores
from pretrace.scores.result import top_indices
from pretrace.stages import File, Folder, Source, StageCache, StageKey
from pretrace.storage import check_cache, output_folder, read_json, read_jsonl_rows, write_json, write_jsonl
from pretrace.training.finetune import read_finetune_record
from pretrace.modeling.stage import ModelOptions
from pretrace.scores.explanations import Explain
from pretrace.workflows.fit import fit
from pretrace.methods.explain import explain_pairs, explanation_counts, explanation_fields, top_pairs
from pretrace.scores.index import check_index
from pretrace.store import CorpusStore
from pretrace.workflows.recall import build_corpus_store, store_candidates
from pretrace.workflows.score import ScoreSettings, build_context, score
from pretrace.workflows.settings import Retrieval, TraceSettings

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.html"
SCORING_FIELDS = ("method", "alpha", "damping", "force", "top_k")  # what scores depend on


@dataclass(frozen=True)
class TraceQuery:
    query: Query
    generated: bool
    evidence_ids: tuple[str, ...] | None


# -- queries ---------------------------------------------------------------------------------------

def read_trace_queries(path: str | Path, fields: Fields = DEFAULT_FIELDS) -> list[TraceQuery]:
    """Queries with an optional completion and optional ground-truth evidence (corpus document ids), from any
    record source; ids follow the one rule of every source (unique; default: the position)."""
    queries, unique = [], UniqueIds("query")
    for index, (where, obj) in enumerate(iter_records(path, fields)):
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PretraceError(f"{where}: a trace query needs a non-empty string 'prompt' (found: {sorted(obj)}; --prompt-field names another column).")
        if completion is not None and (not isinstance(completion, str) or not completion.strip()):
            raise PretraceError(f"{where}: 'completion' must be a non-empty string; drop it to trace the model's own answer.")
        encodable(where, "prompt", prompt)
        if completion is not None:
            encodable(where, "completion", completion)
        evidence = obj.get("evidence_ids")
        if evidence is not None and (not isinstance(evidence, list) or not all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in evidence)):
            raise PretraceError(f"{where}: 'evidence_ids' must be a list of corpus document ids (strings or integers).")
        queries.append(TraceQuery(Query(unique(obj, index, where), prompt, completion), False,
                                  None if evidence is None else tuple(encodable(where, "evidence_ids", str(e)) for e in evidence)))
    if not queries:
        raise PretraceError(f"{path}: no queries; the file is empty.")
    return queries


def first_line(text: str) -> str:
    """The text up to the first line break that follows some non-blank text (answers are one line)."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    cut = stripped.find("\n")
    return text if cut < 0 else text[: offset + cut]


@torch.no_grad()
def generate_completions(model_path: str | Path, queries: list[TraceQuery], max_new_tokens: int, options: ModelOptions) -> list[TraceQuery]:
    """Fill in missing completions with the model's greedy answer (prompt tokenized as the measurement does)."""
    missing = [q for q in queries if q.query.completion is None]
    if not missing:
        return queries
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, options.dtype, options.torch_device())
    length = check_model_tokenizer(model_path, model, tokenizer, options.max_length)
    device = next(model.parameters()).device
    answers = {}
    for item in progress_bar(missing, desc="generate completions", unit="query"):
        prompt_ids = torch.tensor([tokenizer(item.query.prompt, add_special_tokens=True)["input_ids"]], device=device)
        room = length - prompt_ids.shape[1]  # the model's positions (or --max-length) bound prompt and answer together
        if room < 1:
            raise PretraceError(f"query {item.query.id!r}: its prompt fills all {length} positions (--max-length), leaving none "
                                "to answer in; shorten the prompt, or give the query a 'completion'.")
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=min(max_new_tokens, room),
                                do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = first_line(tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True))
        if not text.strip():
            raise PretraceError(f"query {item.query.id!r}: the fine-tuned model answered with no text; give a 'completion' for it.")
        answers[item.query.id] = text
    return [TraceQuery(Query(q.query.id, q.query.prompt, answers[q.query.id]), True, q.evidence_ids)
            if q.query.id in answers else q for q in queries]


def _query_rows(queries: list[TraceQuery]) -> list[dict]:
    return [{"id": q.query.id, "prompt": q.query.prompt, "completion": q.query.completion, "generated": q.generated,
             "evidence_ids": None if q.evidence_ids is None else list(q.evidence_ids)} for q in queries]


def _from_rows(rows: list[dict]) -> list[TraceQuery]:
    return [TraceQuery(Query(r["id"], r["prompt"], r["completion"]), r["generated"],
                       None if r["evidence_ids"] is None else tuple(r["evidence_ids"])) for r in rows]


# -- corpus and retrieval --------------------------------------------------------------------------

def read_corpus(path: str | Path, fields: Fields = DEFAULT_FIELDS) -> list[Document]:
    """Every corpus document, validated (unique ids included) by the reader all commands share."""
    return list(progress_bar(iter_documents(path, fields), desc="read corpus", unit="doc", leave=False))


def by_length(indices, documents: list[Document]) -> list[int]:
    """Indices ordered by text length, so batches hold documents of similar length and little padding."""
    return sorted(indices, key=lambda i: (len(documents[i].text), i))


def retrieve(settings: Retrieval, documents: list[Document], queries: list[TraceQuery], out: Path) -> tuple[list[list[int]], list[list[float]]]:
    """Per query its candidates (corpus indices, best first) and their retrieval scores; 'none': every document."""
    if settings.retriever == "none":
        everything = list(range(len(documents)))
        return [everything for _ in queries], [[0.0] * len(documents) for _ in queries]
    k = min(settings.candidates, len(documents))
    folder = Path(settings.index) if settings.index else out / f"index-{settings.retriever}"
    options = {"model": settings.embedding_model} if settings.retriever == "embedding" else {}
    retriever = make_retriever(settings.retriever, [d.text for d in documents], folder=folder, **options)
    indices, values = retriever.search([q.query.text for q in queries], k)  # the question with its answer, as the paper
    return indices.tolist(), values.tolist()


def evidence_indices(queries: list[TraceQuery], documents: list[Document]) -> list[list[int]] | None:
    """Corpus indices of each query's evidence, or None if no query names any."""
    if all(q.evidence_ids is None for q in queries):
        return None
    position = {d.id: i for i, d in enumerate(documents)}
    relevant = []
    for q in queries:
        unknown = [e for e in q.evidence_ids or () if e not in position]
        if unknown:
            raise PretraceError(f"query {q.query.id!r}: evidence ids {unknown[:3]} are not document ids of the corpus; "
                                "evidence_ids must name corpus 'id' fields (or line numbers when the corpus has none).")
        relevant.append([position[e] for e in q.evidence_ids or ()])
    return relevant


# -- factors ---------------------------------------------------------------------------------------

def ensure_factors(settings: TraceSettings, options: ModelOptions, documents: list[Document], out: Path,
                   cache: StageCache) -> tuple[StageKey | Folder, StageKey | Folder, str, str]:
    """The two factor folders (the given ones, or fitted and cached under OUT/factors) and what they were
    computed from: a given folder's stamp, or the fitting stage's key."""
    pretrained, pretrained_input = settings.pretrained_factors, None
    if pretrained is None:
        data, pretrained = out / "factors" / "pretrained-sample.jsonl", out / "factors" / "pretrained"
        key = cache.key("factors-pretrained", model=Folder(settings.pretrained), corpus=Source(settings.corpus),
                        documents=settings.fit_documents, seed=settings.seed, options=options)
        if cache.stale(key, data, pretrained):
            sample = _fitting_sample(documents, settings.fit_documents, settings.seed)
            write_jsonl(data, ({"id": d.id, "text": d.text} for d in sample))
            fit(settings.pretrained, data, pretrained, options, FitSettings(seed=settings.seed))
            cache.record(key)
        pretrained_input = key
    finetuned, finetuned_input = settings.finetuned_factors, None
    if finetuned is None:
        data = settings.finetune_data or (read_finetune_record(settings.finetuned) or {}).get("data")
        if data is None or not Path(data).exists():
            raise PretraceError(
                f"the fine-tuned factors are missing and no fine-tuning data is known{f' ({data} is gone)' if data else ''}; "
                "pass --finetuned-factors (from `pretrace fit` on the fine-tuned model) or --finetune-data (its prompt/completion pairs)."
            )
        finetuned = out / "factors" / "finetuned"
        key = cache.key("factors-finetuned", model=Folder(settings.finetuned), data=Source(data), seed=settings.seed, options=options)
        if cache.stale(key, finetuned):
            fit(settings.finetuned, data, finetuned, options, FitSettings(seed=settings.seed))
            cache.record(key)
        finetuned_input = key
    return (pretrained_input or Folder(pretrained), finetuned_input or Folder(finetuned), str(pretrained), str(finetuned))


def _fitting_sample(documents: list[Document], count: int, seed: int) -> list[Document]:
    if count >= len(documents):
        return documents
    chosen = random.Random(seed).sample(range(len(documents)), count)
    return [documents[i] for i in by_length(chosen, documents)]


# -- scoring ---------------------------------------------------------------------------------------

def candidate_union(candidates: list[list[int]], documents: list[Document]) -> list[int]:
    """Distinct candidate indices over all queries (each is scored once), shortest document first."""
    return by_length({index for row in candidates for index in row}, documents)


def candidate_columns(candidates: list[list[int]], union: list[int]) -> list[list[int]]:
    """Each query's candidates (corpus indices, best retrieved first) as columns of the union's scores, in that order."""
    column = {index: c for c, index in enumerate(union)}
    return [[column[i] for i in row] for row in candidates]


def rank_candidates(scores: torch.Tensor, columns: list[list[int]], top_k: int) -> torch.Tensor:
    """[Q, top_k] columns of `scores` ([Q, len(union)]): each query's best among its own candidate `columns`."""
    rows = []
    for q, row in enumerate(columns):
        own = torch.tensor(row)
        best = top_indices(scores[q, own].unsqueeze(0), top_k)[0]
        rows.append(own[best])
    return torch.stack(rows)


def _result_rows(queries: list[TraceQuery], documents: list[Document], union: list[int], candidates: list[list[int]],
                 retrieval_scores: list[list[float]], scores: torch.Tensor, top: torch.Tensor, details: dict,
                 relevant: list[list[int]] | None, ranked_retrieval: bool, tokenizer) -> list[dict]:
    rows = []
    for q, item in enumerate(queries):
        retrieval_rank = {index: rank for rank, index in enumerate(candidates[q], start=1)}
        evidence = set(relevant[q]) if relevant is not None else set()
        listed = []
        for rank, col in enumerate(top[q].tolist(), start=1):
            index = union[col]
            listed.append({
                "id": documents[index].id, "index": index, "text": documents[index].text,
                "score": float(scores[q, col]), "rank": rank,
                "retrieval_rank": retrieval_rank[index] if ranked_retrieval else None,
                "retrieval_score": retrieval_scores[q][retrieval_rank[index] - 1] if ranked_retrieval else None,
                "is_evidence": index in evidence if relevant is not None else None,
                **explanation_fields(details[(q, col)], tokenizer),
            })
        row = {"query_id": item.query.id, "prompt": item.query.prompt, "completion": item.query.completion,
               "completion_generated": item.generated, "documents": listed}
        if relevant is not None and item.evidence_ids is not None:
            found = evidence & set(candidates[q])
            row.update(evidence_ids=list(item.evidence_ids), evidence_in_candidates=len(found),
                       evidence_in_top_k=sum(1 for doc in listed if doc["is_evidence"]))
        rows.append(row)
    return rows


# -- the run ---------------------------------------------------------------------------------------

def trace(settings: TraceSettings, options: ModelOptions | None = None, progress: bool = True) -> dict:
    """Run every stage (reusing finished ones) and write results.jsonl, report.html and the plots; returns the summary.

    --out is checked and locked first, like every command's, but as a run folder: its cached stages are reused, not refused."""
    require_instance("settings", settings, TraceSettings)
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    with output_folder(settings.out, False, _inputs(settings), command="trace", resume=True):
        retrieval = settings.retrieval
        if retrieval.index is not None:
            command = "index" if retrieval.retriever == "gradient" else f"{retrieval.retriever}-index"  # a store is `pretrace index`'s folder
            check_cache(retrieval.index, command, "--index", _inputs(settings), {"--out": settings.out})
        return _trace(settings, options or ModelOptions(), progress)


def _inputs(settings: TraceSettings) -> dict[str, str | None]:
    """The paths `trace` only reads (adapters' base models included), which its --out must neither be, lie inside
    (folders) nor contain (stale stages are removed)."""
    inputs = {**model_folders("--pretrained", settings.pretrained), **model_folders("--finetuned", settings.finetuned, base=settings.pretrained)}
    return inputs | {"--embedding-model": settings.retrieval.embedding_model} | {flag: getattr(settings, flag.removeprefix("--").replace("-", "_")) for flag in (
        "--corpus", "--queries", "--pretrained-factors", "--finetuned-factors", "--finetune-data")}


def _trace(settings: TraceSettings, options: ModelOptions, progress: bool) -> dict:
    source = read_trace_queries(settings.queries, options.fields())  # bad inputs are refused before anything is written
    if all(q.query.completion is not None for q in source) and settings.max_new_tokens != TraceSettings.max_new_tokens:
        raise PretraceError("--max-new-tokens has no effect: every query has a 'completion', so none is generated; drop it.")
    documents = read_corpus(settings.corpus, options.fields())
    for folder in (settings.pretrained, settings.finetuned):
        check_model_dir(folder)
    run = _TraceRun(settings, options, documents, progress)
    queries, queries_key = run.queries(source)
    two_stage = settings.retrieval.retriever == "gradient"  # its recall stage needs both stages' factors first
    factors = ensure_factors(settings, options, documents, run.out, run.cache) if two_stage else None
    if two_stage:
        run.lap("factors_seconds")
    candidates, retrieval_scores, retrieval_key = run.retrieve(queries, queries_key, factors)
    relevant = evidence_indices(queries, documents)
    recall = retrieval_recall(candidates, relevant) if relevant is not None and any(relevant) else None
    if recall is not None and progress:
        print(f"retrieval recall of the known evidence within the {len(candidates[0])} candidates: {recall:.3f}"
              " (evidence the retriever misses can never be ranked by influence)")
    run.lap("retrieval_seconds")
    if not two_stage:
        factors = ensure_factors(settings, options, documents, run.out, run.cache)
        run.lap("factors_seconds")
    union = candidate_union(candidates, documents)
    rows, explained = run.results(queries, queries_key, candidates, retrieval_scores, retrieval_key, union, relevant, factors)
    run.lap("explanation_seconds")
    summary = {
        "settings": to_dict(settings), "options": to_dict(options), "queries": len(queries),
        "candidates_per_query": len(candidates[0]), "distinct_candidates": len(union), "retrieval_recall": recall,
        "evidence_in_top_k": _top_k_recall(rows, relevant), "timings": run.timings, "stages": run.cache.statuses,
        "explanations": explained,
    }
    write_report_files(run.out, rows, candidates, union, summary)
    run.lap("report_seconds")
    write_json(run.out / "trace.json", summary)
    return summary


class _TraceRun:
    """The stages of one trace in its run folder: each computed, or reused from the stage cache when its inputs are
    unchanged, and timed (wall and CPU seconds: on a shared machine CPU time is what a stage would take alone)."""

    def __init__(self, settings: TraceSettings, options: ModelOptions, documents: list[Document], progress: bool):
        self.settings, self.options, self.documents, self.progress = settings, options, documents, progress
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out)
        self.timings: dict[str, float] = {}
        self.clock = (time.perf_counter(), time.process_time())

    def lap(self, name: str, moved: tuple[float, float] = (0.0, 0.0)) -> None:
        """Close the stage `name`; `moved`: (wall, CPU) seconds of it that belong to the next (explanations taken while scoring)."""
        now = (time.perf_counter(), time.process_time())
        self.timings[name] = round(now[0] - self.clock[0] - moved[0], 3)
        self.timings[name.replace("_seconds", "_cpu_seconds")] = round(now[1] - self.clock[1] - moved[1], 3)
        self.clock = (now[0] - moved[0], now[1] - moved[1])

    def queries(self, source: list[TraceQuery]) -> tuple[list[TraceQuery], StageKey]:
        """The queries with every missing completion generated by the fine-tuned model."""
        settings, path = self.settings, self.out / "queries.jsonl"
        key = self.cache.key("queries", queries=Source(settings.queries), finetuned=Folder(settings.finetuned),
                             max_new_tokens=settings.max_new_tokens, dtype=self.options.dtype)
        if self.cache.stale(key, path):
            queries = generate_completions(settings.finetuned, source, settings.max_new_tokens, self.options)
            write_jsonl(path, _query_rows(queries))
            self.cache.record(key)
        else:
            queries = _from_rows(read_jsonl_rows(path))
        self.lap("completions_seconds")
        return queries, key

    def retrieve(self, queries: list[TraceQuery], queries_key: StageKey, factors: tuple | None = None) -> tuple[list[list[int]], list[list[float]], StageKey]:
        """Each query's candidates and their retrieval scores; the retriever builds (or resumes) its index in
        OUT/index-RETRIEVER, an index of another corpus removed first. `factors` (--retriever gradient): what
        `ensure_factors` gave, which the store and the queries' sketched scores depend on."""
        retrieval, path = self.settings.retrieval, self.out / "candidates.json"
        two_stage = {} if factors is None else {"pretrained": Folder(self.settings.pretrained), "pretrained_factors": factors[0],
                                                  "sketch_dim": retrieval.sketch_dim, "options": self.options}
        index_key = self.cache.key("index", corpus=Source(self.settings.corpus), retriever=retrieval.retriever,
                                   embedding_model=retrieval.embedding_model, given=retrieval.index, **two_stage)
        index_stale = retrieval.index is None and retrieval.retriever != "none" and self.cache.stale(index_key, self.out / f"index-{retrieval.retriever}")
        scoring = {} if factors is None else {"finetuned": Folder(self.settings.finetuned), "finetuned_factors": factors[1],
                                              "scoring": {name: getattr(self.settings, name) for name in SCORING_FIELDS}}
        key = self.cache.key("retrieval", index=index_key, queries=queries_key, candidates=retrieval.candidates, **scoring)
        if self.cache.stale(key, path):
            if factors is None:
                candidates, retrieval_scores = retrieve(retrieval, self.documents, queries, self.out)
            else:
                candidates, retrieval_scores = self._recall_stage(factors)
            write_json(path, {"query_ids": [q.query.id for q in queries], "candidates": candidates, "retrieval_scores": retrieval_scores})
            if index_stale:
                self.cache.record(index_key)
            self.cache.record(key)
            return candidates, retrieval_scores, key
        stored = read_json(path)
        return stored["candidates"], stored["retrieval_scores"], key

    def _recall_stage(self, factors: tuple) -> tuple[list[list[int]], list[list[float]]]:
        """--retriever gradient: the corpus store (built, or resumed, in OUT/index-gradient or --index), then each
        query's top K by its sketched multi-stage score."""
        settings, retrieval = self.settings, self.settings.retrieval
        folder = Path(retrieval.index) if retrieval.index else self.out / "index-gradient"
        if not (folder / "index.json").is_file():
            build_corpus_store(settings.pretrained, settings.corpus, folder, factors[2], retrieval.sketch_dim, self.options, self.progress)
        score_settings = settings.score_settings(str(self.out / "queries.jsonl"), settings.corpus, str(self.out / "recall"), factors[2], factors[3])
        context = build_context(score_settings, self.options)
        check_index(folder, context.document_stage, settings.corpus, settings.corpus)  # a given --index: of this corpus and model
        attributor = make_attributor(score_settings, context.alpha)
        attributor.fit(context)
        return store_candidates(CorpusStore(folder), attributor, context, retrieval.candidates)

    def results(self, queries: list[TraceQuery], queries_key: StageKey, candidates: list[list[int]], retrieval_scores: list[list[float]],
                retrieval_key: StageKey, union: list[int], relevant: list[list[int]] | None, factors: tuple) -> tuple[list[dict], dict | None]:
        """results.jsonl: each query's top candidates by multi-stage influence with their explanations, scoring the
        union of the candidates once (or reusing its scores); the explanation counts of this run (None: reused)."""
        settings, options, out = self.settings, self.options, self.out
        pretrained_input, finetuned_input, pretrained_factors, finetuned_factors = factors
        union_file = out / "candidates.jsonl"
        write_jsonl(union_file, ({"id": self.documents[i].id, "text": self.documents[i].text} for i in union))
        score_settings = settings.score_settings(str(out / "queries.jsonl"), str(union_file), str(out / "scores"), pretrained_factors, finetuned_factors)
        scores_key = self.cache.key("scores", union=File(union_file), queries=queries_key, retrieval=retrieval_key, pretrained=Folder(settings.pretrained),
                                    finetuned=Folder(settings.finetuned), pretrained_factors=pretrained_input, finetuned_factors=finetuned_input,
                                    scoring={name: getattr(settings, name) for name in SCORING_FIELDS}, options=options)
        results_key = self.cache.key("results", scores=scores_key)  # the explanations read exactly what the scores did
        if not self.cache.stale(results_key, out / RESULTS_FILE):
            return read_jsonl_rows(out / RESULTS_FILE), None
        context = build_context(score_settings, options)
        attributor = make_attributor(score_settings, context.alpha)
        columns = candidate_columns(candidates, union)  # the ranking below and the pass's explanations: the same order
        scores, streamed = self._scores(score_settings, context, attributor, scores_key, Explain(settings.top_k, among=columns))
        top = rank_candidates(scores, columns, settings.top_k)
        pairs = top_pairs(top)
        details = explain_pairs(attributor, context, pairs, streamed)
        rows = _result_rows(queries, self.documents, union, candidates, retrieval_scores, scores, top, details, relevant,
                            settings.retrieval.retriever != "none", context.document_stage.tokenizer)
        write_jsonl(out / RESULTS_FILE, rows)
        self.cache.record(results_key)
        return rows, explanation_counts(pairs, streamed)

    def _scores(self, score_settings: ScoreSettings, context, attributor, key: StageKey, explain: Explain) -> tuple[torch.Tensor, dict | None]:
        """The union's scores: from one pass that fits the attributor (reused for the explanations) and explains each
        query's top candidates as it goes, or read back from the cached stage (the attributor fitted apart)."""
        streamed, in_pass = None, (0.0, 0.0)
        if self.cache.stale(key, self.out / "scores"):
            result = score(score_settings, self.options, context, attributor, explain=explain)
            scores, streamed = result.scores, result.explanations
            in_pass = (result.timings["explanation_seconds"], result.timings["explanation_in_pass_cpu_seconds"])
            self.cache.record(key)
        else:
            scores = load_scores(self.out / "scores")[0]["scores"].double()
            attributor.fit(context)
        self.lap("scoring_seconds", moved=in_pass)
        return scores, streamed


def _top_k_recall(rows: list[dict], relevant: list[list[int]] | None) -> float | None:
    """Share of known evidence that influence ranked into the top-k (compare with the retriever's recall)."""
    total = sum(len(r) for r in relevant or [])
    return sum(row.get("evidence_in_top_k", 0) for row in rows) / total if total else None


def write_report_files(out: Path, rows: list[dict], candidates: list[list[int]], union: list[int], summary: dict) -> None:
    from pretrace.report import plot_layer_influence, plot_score_distributions, write_report

    info = {key: summary[key] for key in ("queries", "candidates_per_query", "distinct_candidates", "retrieval_recall", "evidence_in_top_k")}
    info["models"] = {"pretrained": summary["settings"]["pretrained"], "finetuned": summary["settings"]["finetuned"]}
    info["retriever"] = summary["settings"]["retrieval"]["retriever"]
    info["preset"] = summary["options"]["preset"]
    write_report(rows, out / REPORT_FILE, title="pretrace trace: pre-training documents behind the fine-tuned model's answers", run_info=info)
    scores = load_scores(out / "scores")[0]["scores"]
    candidate_scores = torch.stack([scores[q, row] for q, row in enumerate(candidate_columns(candidates, union))])
    plot_score_distributions(candidate_scores, out / "score_distributions.png", query_ids=[row["query_id"] for row in rows])
    plot_layer_influence(rows, out / "layer_influence.png")
