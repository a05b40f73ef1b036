"""The three gradient methods of fact tracing, scored in one pass over the candidates (each candidate's
gradient is computed once per model and reused by every query and method):

- multi-stage EK-FAC:   α ∇m(x; θ_ft)ᵀ (H_ft + αI)⁻¹ H_pt⁻¹ ∇ℓ(z; θ_pt)   (the full formula, H_pt⁻¹ included)
- fine-tuned-only EK-FAC: ∇m(x; θ_ft)ᵀ (H_ft + αI)⁻¹ ∇ℓ(z; θ_ft)         (single-stage influence on the
  fine-tuned model; H_ft + αI is the curvature of the proximal fine-tuning objective, so the
  (H_ft + αI)⁻¹ ∇m product is shared with multi-stage)
- gradient dot product: ∇m(x; θ_ft)ᵀ ∇ℓ(z; θ_pt)

Memory: every query's three preconditioned gradients are held as rows of two matrices (`[2Q, P]` against
pre-trained candidate gradients, `[Q, P]` against fine-tuned ones; P = tracked parameters), built module
by module so the raw gradients are released as they are used. Candidates are streamed in batches; a
batch's per-example gradients `[B, P]` meet all rows in one matrix product, so the weights are read once
per batch rather than once per query. `weights_bytes` lets the caller refuse sizes that do not fit.
The running scores are checkpointed (safetensors + JSON), so a killed run resumes at the last batch saved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pretrace.curvature import EKFAC, Factors
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.gradients.capture import capture
from pretrace.gradients.task import LanguageModelingTask
from pretrace.scores.pairwise import query_gradients
from pretrace.storage import read_json, read_tensors, write_json, write_tensors
from pretrace.modeling.stage import Stage

GRADIENT_METHODS = ("multi-stage-ekfac", "finetuned-ekfac", "gradient-dot")


@dataclass
class GradientScores:
    scores: dict[str, torch.Tensor]  # method -> [Q, N] float64
    query_ids: list[str]
    candidate_ids: list[str]
    seconds: dict[str, float] = field(default_factory=dict)


def weights_bytes(stage: Stage, queries: int, candidate_batch: int) -> int:
    """Peak float32 bytes: the raw query gradients while the 3 rows per query are filled, plus a candidate batch's gradients."""
    parameters = sum(t.num_parameters for t in stage.tracked)
    return 4 * parameters * (4 * queries + 2 * candidate_batch)


def _flat_gradients(stage: Stage, batch) -> torch.Tensor:
    """[B, P] per-example loss gradients of a candidate batch, modules in tracked order."""
    task = LanguageModelingTask()
    captured = capture(stage.model, stage.tracked, lambda: task.document_loss(stage.model, batch))
    return torch.cat([captured.example_gradients(t.name).float().flatten(1) for t in stage.tracked], dim=1)


def query_rows(finetuned: Stage, queries: Sequence[Query], pretrained_factors: Factors, finetuned_factors: Factors,
               alpha: float, damping_factor: float, seconds: dict[str, float]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(ids, rows against pre-trained gradients [multi-stage; gradient-dot] `[2Q, P]`, rows against fine-tuned ones `[Q, P]`)."""
    start = time.perf_counter()
    ids, grads = query_gradients(finetuned.model, finetuned.tracked, finetuned.query_batches(list(queries)), progress=True)
    seconds["query_gradients"] = time.perf_counter() - start  # redone on resume: the latest run's time
    count, sizes = len(ids), [t.num_parameters for t in finetuned.tracked]
    pretrained_rows = torch.empty(2 * count, sum(sizes))
    finetuned_rows = torch.empty(count, sum(sizes))
    finetuned_inverse = EKFAC(finetuned_factors, damping=alpha)
    pretrained_inverse = EKFAC(pretrained_factors, damping=None, damping_factor=damping_factor)
    offset, finetuned_time, pretrained_time = 0, 0.0, 0.0
    for t, size in tqdm(list(zip(finetuned.tracked, sizes)), desc="preconditioning queries", unit="module", leave=False):
        gradient = grads.pop(t.name).float()
        start = time.perf_counter()
        through_finetuned = finetuned_inverse.apply_module(t.name, gradient)
        middle = time.perf_counter()
        multi_stage = alpha * pretrained_inverse.apply_module(t.name, through_finetuned)
        finetuned_time, pretrained_time = finetuned_time + middle - start, pretrained_time + time.perf_counter() - middle
        columns = slice(offset, offset + size)
        pretrained_rows[:count, columns] = multi_stage.flatten(1)
        pretrained_rows[count:, columns] = gradient.flatten(1)
        finetuned_rows[:, columns] = through_finetuned.flatten(1)
        offset += size
    seconds.update(finetuned_preconditioning=finetuned_time, pretrained_preconditioning=pretrained_time)
    return ids, pretrained_rows, finetuned_rows


class _Progress:
    """Scores of the candidates done so far, saved every few batches under a signature of the whole job."""

    def __init__(self, folder: Path, signature: dict):
        self.folder, self.signature = folder, signature
        self.tensors, self.meta = folder / "progress.safetensors", folder / "progress.json"

    def load(self, queries: int) -> tuple[int, torch.Tensor, torch.Tensor, dict]:
        if self.meta.is_file() and self.tensors.is_file():
            meta = read_json(self.meta)
            if meta.get("signature") != self.signature:  # progress of a job whose inputs have since changed: start over
                return 0, torch.zeros(2 * queries, 0, dtype=torch.float64), torch.zeros(queries, 0, dtype=torch.float64), {}
            saved = read_tensors(self.tensors)
            return int(meta["done"]), saved["pretrained"], saved["finetuned"], meta["seconds"]
        return 0, torch.zeros(2 * queries, 0, dtype=torch.float64), torch.zeros(queries, 0, dtype=torch.float64), {}

    def save(self, done: int, pretrained: torch.Tensor, finetuned: torch.Tensor, seconds: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_tensors(self.tensors, {"pretrained": pretrained.contiguous(), "finetuned": finetuned.contiguous()})
        write_json(self.meta, {"signature": self.signature, "done": done, "seconds": seconds})


def score_candidates(pretrained: Stage, finetuned: Stage, queries: Sequence[Query], candidates: Sequence[Document],
                     pretrained_factors: Factors, finetuned_factors: Factors, alpha: float, damping_factor: float,
                     progress_dir: Path, signature: dict, checkpoint_every: int = 10) -> GradientScores:
    """Scores `[Q, N]` of every query against every candidate for the three gradient methods."""
    if alpha <= 0:
        raise PretraceError(f"multi-stage influence needs a positive alpha (the fine-tuning proximity strength), got {alpha}.")
    if [t.name for t in pretrained.tracked] != [t.name for t in finetuned.tracked]:
        raise PretraceError("the pre-trained and fine-tuned models track different modules; load both with the same module selection.")
    state = _Progress(progress_dir, signature)
    done, pretrained_scores, finetuned_scores, saved_seconds = state.load(len(queries))
    seconds = dict(saved_seconds)
    ids, pretrained_rows, finetuned_rows = query_rows(finetuned, queries, pretrained_factors, finetuned_factors, alpha, damping_factor, seconds)
    batch_size = pretrained.options.batch_size
    order = list(candidates)
    bar = tqdm(total=len(order), initial=done, desc="candidate gradients", unit="sentence")
    batches_since_save = 0
    pretrained_parts, finetuned_parts = [pretrained_scores], [finetuned_scores]
    while done < len(order):
        chunk = order[done : done + batch_size]
        for stage, rows, parts, key in ((pretrained, pretrained_rows, pretrained_parts, "pretrained"), (finetuned, finetuned_rows, finetuned_parts, "finetuned")):
            start = time.perf_counter()
            batch = next(stage.document_batches(chunk)()).to(next(stage.model.parameters()).device)
            gradients = _flat_gradients(stage, batch)
            middle = time.perf_counter()
            parts.append((rows @ gradients.T).double())
            seconds[f"{key}_candidate_gradients"] = seconds.get(f"{key}_candidate_gradients", 0.0) + middle - start
            seconds[f"{key}_products"] = seconds.get(f"{key}_products", 0.0) + time.perf_counter() - middle
            del gradients
        done += len(chunk)
        bar.update(len(chunk))
        batches_since_save += 1
        if batches_since_save >= checkpoint_every or done == len(order):
            pretrained_parts, finetuned_parts = [torch.cat(pretrained_parts, 1)], [torch.cat(finetuned_parts, 1)]
            state.save(done, pretrained_parts[0], finetuned_parts[0], seconds)
            batches_since_save = 0
    bar.close()
    pretrained_scores, finetuned_scores = torch.cat(pretrained_parts, 1), torch.cat(finetuned_parts, 1)
    count = len(ids)
    scores = {"multi-stage-ekfac": pretrained_scores[:count], "gradient-dot": pretrained_scores[count:], "finetuned-ekfac": finetuned_scores}
    return GradientScores(scores, ids, [c.id for c in order], seconds)
