"""The gradient methods of fact tracing, each one of pretrace's own attributors, scored through the one loop:

- multi-stage EK-FAC:     α ∇m(x; θ_ft)ᵀ (H_ft + αI)⁻¹ H_pt⁻¹ ∇ℓ(z; θ_pt)   (`multi_stage`)
- pre-trained-only EK-FAC: ∇m(x; θ_ft)ᵀ H_pt⁻¹ ∇ℓ(z; θ_pt)                 (the ablation: the same without (H_ft + αI)⁻¹)
- fine-tuned-only EK-FAC:  ∇m(x; θ_ft)ᵀ (H_ft + αI)⁻¹ ∇ℓ(z; θ_ft)           (single-stage influence on the fine-tuned model)
- gradient dot product:    ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt)

Every method prepares its query weights once (`precondition_queries`: EK-FAC ones kept in their eigenbasis and
truncated to `query_rank` per module, with the error recorded; gradient-dot ones as their exact token factors),
and `score_weight_sets` meets them all with each candidate batch's gradients, captured once per model: the
cost grows with the candidates, not with queries × candidates. Candidates are scored in chunks, each a cached
stage of its own, so a killed run resumes at the last chunk saved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrace.data.records import Document
from pretrace.methods.base import ScoringContext
from pretrace.methods.gradient import PreconditionedGradients, multi_stage, single_stage
from pretrace.modeling.stage import Stage
from pretrace.scores.pairwise import score_weight_sets
from pretrace.stages import StageCache
from pretrace.storage import read_json, read_record, read_tensors, write_json, write_record, write_tensors

GRADIENT_METHODS = ("multi-stage-ekfac", "pretrained-ekfac", "finetuned-ekfac", "gradient-dot")
ON_PRETRAINED = ("multi-stage-ekfac", "pretrained-ekfac", "gradient-dot")  # candidates' gradients on θ_pt; the rest on θ_ft


def attributor(method: str, pretrained_factors: Path, finetuned_factors: Path, alpha: float, damping_factor: float,
               query_rank: int | None) -> PreconditionedGradients:
    """The attributor of one fact-tracing method: H_pt damped by `damping_factor` × its mean eigenvalue, H_ft by α."""
    made = {
        "multi-stage-ekfac": lambda: multi_stage("ekfac", pretrained_factors, finetuned_factors, alpha, None, damping_factor, None),
        "pretrained-ekfac": lambda: single_stage("ekfac", pretrained_factors, None, damping_factor),
        "finetuned-ekfac": lambda: single_stage("ekfac", finetuned_factors, alpha, damping_factor),
        "gradient-dot": lambda: single_stage("identity", None, None, damping_factor),
    }[method]()
    made.query_rank = query_rank
    return made


@dataclass
class WeightSet:
    """One method at one α: its attributor and the context it is fitted and prepared in."""

    attributor: PreconditionedGradients
    context: ScoringContext


def weight_bytes(stage: Stage, queries: int, query_rank: int | None, alphas: int) -> int:
    """Float32 bytes of the prepared query weights held in the pre-trained pass: per α, the two EK-FAC sets (rank
    `query_rank` per module, or dense) and gradient-dot's token factors (up to max_length tokens, or dense)."""
    tokens = stage.options.max_length
    ekfac = sum(t.num_parameters if query_rank is None else min(t.num_parameters, query_rank * (t.d_out + t.d_in_total)) for t in stage.tracked)
    dot = sum(min(t.num_parameters, tokens * (t.d_out + t.d_in_total)) for t in stage.tracked)
    return 4 * queries * alphas * (2 * ekfac + dot)


def score_candidates(sets: dict[str, WeightSet], stage: Stage, candidates: Sequence[Document], chunk: int, cache: StageCache,
                     name: str, inputs: dict, folder: Path, seconds: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`[Q, N]` float64 scores of every set against every candidate's gradient on `stage`, chunk by cached chunk.

    Queries are prepared (fit + precondition) only when some chunk is not yet saved; `queries.json` records
    each set's preparation: seconds, route and each query's relative error of the rank truncation. `seconds`
    gains the preparation and candidate seconds (chunks saved earlier keep theirs in their records)."""
    prepared: dict[str, tuple[list[str], dict]] = {}

    def prepare() -> dict[str, tuple[list[str], dict]]:
        if not prepared:
            record = {}
            for label, weight_set in sets.items():
                start = time.perf_counter()
                weight_set.attributor.fit(weight_set.context)
                prepared[label] = weight_set.attributor.precondition_queries(weight_set.context)
                record[label] = {"seconds": time.perf_counter() - start, "route": weight_set.attributor.query_route,
                                 "query_rank": weight_set.attributor.query_rank, "relative_error": weight_set.attributor.query_rank_error}
            folder.mkdir(parents=True, exist_ok=True)
            write_record(folder / "queries.json", record)
        return prepared

    parts: dict[str, list[torch.Tensor]] = {label: [] for label in sets}
    total = 0.0
    for number, begin in enumerate(range(0, len(candidates), chunk)):
        part = list(candidates[begin:begin + chunk])
        tensors, record = folder / f"{number:04d}.safetensors", folder / f"{number:04d}.json"
        key = cache.key(f"{name}/{number:04d}", **inputs, candidates=[(c.id, c.text) for c in part])
        if cache.stale(key, tensors, record):
            weights = prepare()
            start = time.perf_counter()
            results = score_weight_sets(stage.model, stage.tracked, weights, stage.document_batches(part)(),
                                        num_batches=stage.document_batch_count(part), progress=True)
            saved = {label: result.scores.contiguous() for label, result in results.items()}
            folder.mkdir(parents=True, exist_ok=True)
            write_tensors(tensors, saved)
            write_json(record, {"seconds": time.perf_counter() - start, "candidate_ids": [c.id for c in part],
                                "query_ids": {label: result.query_ids for label, result in results.items()}})
            cache.record(key)
        else:
            saved = read_tensors(tensors)
        total += float(read_json(record)["seconds"])
        for label in sets:
            parts[label].append(saved[label])
    preparation = read_record(folder / "queries.json", "delete the run folder to recompute it")
    seconds[f"{name}.queries"] = sum(float(entry["seconds"]) for entry in preparation.values())
    seconds[f"{name}.candidates"] = total
    return {label: torch.cat(chunks, dim=1) for label, chunks in parts.items()}, preparation

