"""Fit EK-FAC factors by streaming documents twice.

Pass 1 accumulates the Kronecker covariances A = E[a aᵀ] and G = E[g gᵀ] over predicting positions;
their float64 eigendecompositions give the eigenbases Q_A, Q_G. Pass 2 accumulates the corrected
eigenvalues Λ = mean over documents of (Q_Gᵀ ∇W Q_A)², ∇W being the gradient of a document's summed
loss. Labels are sampled from the model (true Fisher) or taken from the data (empirical Fisher).
With the empirical Fisher (the built-in loss, a model in eval mode) both passes capture the same gradients, so
when pass 1's captures fit in `keep_bytes` they are kept and pass 2 reads them instead of running the model
again (the same values).
Each pass checkpoints its running sums, so an interrupted fit resumes where it stopped. Under torchrun
each rank takes every world-th batch and checkpoints its own sums; they are summed over ranks after each pass,
and each rank eigendecomposes only the modules it owns (every world-th) and broadcasts their eigenbases.
Stored factors stay on the CPU; only the two eigenbases go to the model's device for the second pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from pretrace.parallel import collectives, group
from pretrace.config import to_dict
from pretrace.curvature.factors import Factors, ModuleFactors
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients.capture import compute_dtype
from pretrace.gradients.source import Gradients, LiveGradients, sampled_document_loss
from pretrace.gradients.task import LanguageModelingTask, Task, dtype_hint
from pretrace.modeling.loading import parse_dtype
from pretrace.modeling.modules import TrackedModule
from pretrace.progress import note, progress_bar
from pretrace.settings.curvature import FitSettings
from pretrace.storage import SignedParts, fault_point


BatchSource = Callable[[], Iterable[TokenBatch]]


class _Checkpoint:
    """One pass's running sums and their counts in one signed part (see `SignedParts`): replaced in one rename, so a
    killed fit resumes from its last complete save; without a folder (a fit kept in memory) nothing is saved."""

    def __init__(self, parts: SignedParts | None, stage: str):
        self.parts, self.stage = parts, stage

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The saved sums and counts; None when there are none, or when the part no longer matches its seal (said:
        the pass then starts over, so a damaged checkpoint never enters the factors)."""
        saved = None if self.parts is None else self.parts.load(self.stage, f"the {self.stage.split('.')[0]} pass starts over")
        if saved is None:
            return None
        sums, meta = saved
        try:
            counts = {k: int(meta[k]) for k in ("batches", "documents", "tokens")}
        except (KeyError, TypeError, ValueError):
            raise PretraceError(f"{self.parts.path(self.stage)}: not a checkpoint of this pretrace version; delete {self.parts.folder} to start over.") from None
        return sums, counts

    def save(self, sums: dict[str, torch.Tensor], counts: dict) -> None:
        if self.parts is None:
            return
        self.parts.save(self.stage, sums, **counts)
        fault_point("checkpoint")


@dataclass
class _Pass:
    """One streaming pass over the fitting batches: its name, its checkpoint, how its sums start and grow, and the
    offset that seeds its sampled labels (so the two passes draw different labels)."""

    name: str
    checkpoint: _Checkpoint
    init_sums: Callable[[], dict[str, torch.Tensor]]
    accumulate: Callable[[dict, object, TokenBatch], None]
    seed_offset: int
    keep_bytes: int = 0  # keep the batches' captures while they fit in this many bytes (`kept` then holds them all)
    kept: list[Gradients] | None = None


def _run_pass(model, tracked: list[TrackedModule], task: Task, batches: BatchSource, settings: FitSettings, stream: _Pass,
              total: int | None, progress: bool, source: Iterable[Gradients] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Sums over this rank's batches (resumed from the pass's checkpoint), then summed over ranks with their counts.
    `source`: gradients kept from the first pass, instead of capturing them again."""
    restored = stream.checkpoint.load()
    sums, counts = restored if restored is not None else (stream.init_sums(), {"batches": 0, "documents": 0, "tokens": 0})
    if source is None:
        loss = sampled_document_loss(task, settings.seed, stream.seed_offset, sample=settings.fisher == "true")
        source = LiveGradients(model, tracked, batches(), loss, select=collectives.shard)
    kept, kept_bytes = ([], 0) if stream.keep_bytes and restored is None else (None, 0)  # a resumed pass never saw its first batches
    bar = progress_bar(total=collectives.shard_size(total), desc=stream.name, unit="batch", enabled=progress and group.is_main(), initial=counts["batches"])
    for position, gradients in enumerate(source):
        if position < counts["batches"]:
            continue
        stream.accumulate(sums, gradients.captured, gradients.batch)
        kept_bytes += 0 if kept is None else _captured_bytes(gradients.captured)
        if kept is not None and kept_bytes <= stream.keep_bytes:
            kept.append(gradients)
        else:
            kept = None  # over the budget: none kept, every kept batch freed
            gradients.release()  # before the next batch is captured: never two batches' activations at once
        counts["batches"] += 1
        counts["documents"] += len(gradients.batch)
        counts["tokens"] += int(gradients.batch.predict_mask.sum())
        bar.update(1)
        if counts["batches"] % settings.checkpoint_every == 0:
            stream.checkpoint.save(sums, counts)
    bar.close()
    total = collectives.all_reduce_counts(counts)
    if total["documents"] == 0:  # checked before the save: a refused fit leaves no checkpoint of nothing behind
        raise PretraceError("no documents to fit on (each needs at least 2 tokens); pass a file with longer documents.")
    stream.checkpoint.save(sums, counts)
    stream.kept = kept
    return collectives.all_reduce_sums(sums), total


def _same_gradients_twice(model: torch.nn.Module, task: Task, settings: FitSettings) -> bool:
    """Whether both passes capture the same gradients: labels from the data, the built-in loss (a task of one's own
    may draw on the pass's generator) and no dropout."""
    return settings.fisher == "empirical" and type(task) is LanguageModelingTask and not model.training


def _captured_bytes(captured) -> int:
    return sum(x.nbytes for part in (captured.activations, captured.output_gradients) for x in part.values())


def _replay(kept: list[Gradients]) -> Iterator[Gradients]:
    """The kept gradients once more, in order, each let go as soon as it has been read."""
    kept.reverse()
    while kept:
        yield kept.pop()


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 symmetric eigendecomposition (values ascending); the precision decides the small eigenvalues."""
    sym = matrix.double()
    sym = 0.5 * (sym + sym.transpose(-1, -2))
    values, vectors = torch.linalg.eigh(sym)
    return values, vectors


def _owned_eigh(A: torch.Tensor, G: torch.Tensor, owner: int) -> tuple[torch.Tensor, ...]:
    """Eigendecompositions of A and G computed by the `owner` rank and broadcast to the others."""
    if group.rank() == owner:
        (la, qa), (lg, qg) = _eigh(A), _eigh(G)
    else:
        la, qa, lg, qg = (torch.empty(shape, dtype=torch.float64) for shape in (A.shape[:-1], A.shape, G.shape[:-1], G.shape))
    return tuple(collectives.broadcast([la, qa, lg, qg], owner))


def fit_factors(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    batches: BatchSource,
    settings: FitSettings | None = None,
    task: Task | None = None,
    num_batches: int | None = None,
    checkpoint_dir: str | Path | None = None,
    signature: dict | None = None,
    progress: bool = True,
    keep_bytes: int = 0,
) -> Factors:
    """Stream `batches()` twice and return EK-FAC factors for `tracked` (metadata: counts and settings). With the
    empirical Fisher, the first pass's captures are kept for the second when they fit in `keep_bytes`."""
    settings = settings or FitSettings()
    task = task or LanguageModelingTask()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None  # created by the first save: a fit refused earlier leaves none
    # the sums do not depend on how often they are saved nor on the stored precision: a fit refused for overflowing
    # float16 factors resumes with --factor-dtype float32 from its checkpoint
    summed = {k: v for k, v in to_dict(settings).items() if k not in ("checkpoint_every", "factor_dtype")}
    signature = json.loads(json.dumps({"settings": summed, "modules": [t.name for t in tracked], **(signature or {})}, default=str))
    compute = compute_dtype(model)
    parts = None if folder is None else SignedParts(folder, signature, "fit (other model, data or settings)")
    covariances = _Pass("covariances", _Checkpoint(parts, group.per_rank_name("covariances")),
                        lambda: _zero_covariances(tracked), lambda sums, captured, batch: _add_covariances(tracked, compute, sums, captured, batch), 0,
                        keep_bytes if _same_gradients_twice(model, task, settings) else 0)
    cov_sums, cov_counts = _run_pass(model, tracked, task, batches, settings, covariances, num_batches, progress)
    if cov_counts["tokens"] == 0:
        raise PretraceError("the fitting data has no predicted tokens; documents need at least two tokens.")
    eigen, rotations = _eigenbases(model, tracked, cov_sums, cov_counts["tokens"], parse_dtype(settings.factor_dtype))
    correction = _Pass("eigenvalue correction", _Checkpoint(parts, group.per_rank_name("lambda")),
                       lambda: _zero_lambda(tracked, settings.diagonal),
                       lambda sums, captured, batch: _add_lambda(tracked, compute, rotations, settings.diagonal, sums, captured), 500_009)
    kept = covariances.kept
    if kept is not None and progress and group.is_main():
        note(f"eigenvalue correction from the covariance pass's kept captures ({sum(map(_captured_bytes, (g.captured for g in kept))) / 2 ** 30:.2f} GB): no second pass over the model")
    lam_sums, lam_counts = _run_pass(model, tracked, task, batches, settings, correction, num_batches, progress, None if kept is None else _replay(kept))
    if lam_counts["documents"] != cov_counts["documents"]:
        raise PretraceError("the data changed between the two fitting passes; make sure the data source is deterministic.")
    modules = _module_factors(model, tracked, eigen, lam_sums, lam_counts["documents"], settings)
    metadata = {
        "settings": to_dict(settings),
        "documents": lam_counts["documents"],
        "tokens": cov_counts["tokens"],
        "tokens_per_document": cov_counts["tokens"] / lam_counts["documents"],
        "attention_blocks": {t.name: list(t.block_names) for t in tracked},
    }
    return Factors(modules, metadata)


def _zero_covariances(tracked: list[TrackedModule]) -> dict[str, torch.Tensor]:
    sums = {}
    for t in tracked:
        sums[f"{t.name}.A"] = torch.zeros(t.d_in_total, t.d_in_total, dtype=torch.float64)
        sums[f"{t.name}.G"] = torch.zeros(t.n_blocks, t.block_size, t.block_size, dtype=torch.float64)
    return sums


def _add_covariances(tracked: list[TrackedModule], compute: torch.dtype, sums: dict, captured, batch: TokenBatch) -> None:
    """A = Σ a aᵀ and G = Σ g gᵀ (per block) over the batch's predicting positions."""
    mask = batch.predict_mask
    for t in tracked:
        a = captured.activations[t.name][mask].to(compute)
        g = captured.output_gradients[t.name][mask].to(compute).reshape(-1, t.n_blocks, t.block_size)
        sums[f"{t.name}.A"] += (a.T @ a).double().cpu()
        sums[f"{t.name}.G"] += torch.einsum("nki,nkj->kij", g, g).double().cpu()


def _eigenbases(model, tracked: list[TrackedModule], cov_sums: dict, tokens: int, store: torch.dtype) -> tuple[dict, dict]:
    """Per module the means A and G with their float64 eigendecompositions (in the stored precision), and the two
    eigenbases on the model's device for the second pass. Module by module, releasing the float64 sums: the peak
    stays near one copy of the factors."""
    device, compute = next(model.parameters()).device, compute_dtype(model)
    eigen, rotations = {}, {}
    for position, t in enumerate(tracked):
        A = cov_sums.pop(f"{t.name}.A") / tokens
        G = cov_sums.pop(f"{t.name}.G") / tokens
        la, qa, lg, qg = _owned_eigh(A, G, collectives.owner(position))
        eigen[t.name] = tuple(x.to(store) for x in (A, G, la, qa, lg, qg))
        del A, G, la, qa, lg, qg
        # `.to` returns the stored tensor itself when device and precision already match (CPU, float32): one copy, not two.
        rotations[t.name] = tuple(x.to(device, compute) for x in (eigen[t.name][3], eigen[t.name][5]))
    return eigen, rotations


def _zero_lambda(tracked: list[TrackedModule], diagonal: bool) -> dict[str, torch.Tensor]:
    sums = {}
    for t in tracked:
        sums[f"{t.name}.lambda"] = torch.zeros(t.n_blocks, t.block_size, t.d_in_total, dtype=torch.float64)
        if diagonal:
            sums[f"{t.name}.diagonal"] = torch.zeros(t.d_out, t.d_in_total, dtype=torch.float64)
    return sums


def _add_lambda(tracked: list[TrackedModule], compute: torch.dtype, rotations: dict, diagonal: bool, sums: dict, captured) -> None:
    """Λ = Σ over documents of (Q_Gᵀ ∇W Q_A)², and the diagonal Σ ∇W² when asked."""
    for t in tracked:
        qa, qg = rotations[t.name]
        a = captured.activations[t.name].to(compute) @ qa
        g = captured.output_gradients[t.name].to(compute)
        g = g.reshape(*g.shape[:2], t.n_blocks, t.block_size)
        g = torch.einsum("btka,kac->btkc", g, qg)
        rotated = torch.einsum("btkc,bti->bkci", g, a)
        sums[f"{t.name}.lambda"] += rotated.square().sum(0).double().cpu()
        if diagonal:
            sums[f"{t.name}.diagonal"] += captured.example_gradients(t.name).to(compute).square().sum(0).double().cpu()


def _module_factors(model, tracked: list[TrackedModule], eigen: dict, lam_sums: dict, documents: int, settings: FitSettings) -> dict[str, ModuleFactors]:
    """Every module's factors in the stored precision, refused when that precision cannot hold them."""
    store = parse_dtype(settings.factor_dtype)
    modules = {}
    for t in tracked:
        A, G, la, qa, lg, qg = eigen[t.name]
        diagonal = lam_sums[f"{t.name}.diagonal"] / documents if settings.diagonal else None
        modules[t.name] = ModuleFactors(
            activation_covariance=A, gradient_covariance=G,
            activation_eigenvectors=qa, gradient_eigenvectors=qg,
            activation_eigenvalues=la, gradient_eigenvalues=lg,
            lambda_=lam_sums[f"{t.name}.lambda"] / documents, diagonal=diagonal,
        ).to(dtype=store)
        for attr in ModuleFactors.__dataclass_fields__:
            value = getattr(modules[t.name], attr)
            if value is not None and not torch.isfinite(value).all():
                raise PretraceError(
                    f"module {t.name}: its {attr.rstrip('_')} has NaN or infinite values in {settings.factor_dtype}; nothing was written. "
                    f"Store the factors with --factor-dtype float32 or float64{dtype_hint(next(model.parameters()).dtype)}."
                )
    return modules
