"""TRAK (Park et al., 2023): randomly projected per-example gradients, one kernel per model, an ensemble average.

What is computed, for each ensemble model θ_m (the paper trains M models on random halves of the data:
`--trak-ensemble M` trains them inside `fit`, see `trak_ensemble`; `--trak-models` takes given folders):

    φ_m(z)      = P_mᵀ ∇θ ℓ(z; θ_m) ∈ R^k   ℓ: summed cross-entropy of a document's tokens (of a query:
                                           its completion tokens), θ: the tracked modules' weights
    Φ_m         = [φ_m(z_1); …; φ_m(z_N)]    over the documents being scored (TRAK's training set)
    τ_m(x, z_i) = φ_m(x)ᵀ (Φ_mᵀ Φ_m + λ_m I)⁻¹ φ_m(z_i)
    τ(x, z_i)   = (1/M) Σ_m τ_m(x, z_i)

P_m has i.i.d. Rademacher (±1) or standard Gaussian entries scaled by 1/√k (so projected inner products
match unprojected ones in expectation), a different seeded matrix per model. λ_m is --damping, or
--damping-factor × trace(Φ_mᵀΦ_m)/k (the kernel's mean eigenvalue). With one model, M = 1.

The paper's formula is τ(x) = φ(x)ᵀ(ΦᵀΦ)⁻¹Φᵀ Q with features of the margin f = log(p/(1−p)) and
Q = diag(∂ℓ/∂f) = diag(1 − p) (up to sign). Here the features are gradients of the loss itself, so that
factor sits inside every token's gradient (∂(−log p_t)/∂f_t = −(1 − p_t), per token, which one Q entry per
document cannot express for a sum over tokens) and Q = I; the kernel is the Gram matrix of projected loss
gradients. Positive scores mean the document supports the completion, as for every pretrace method.
There is no soft-thresholding.

Compared with the `traker` package: traker divides features by √(number of parameters) (so its λ is ours
divided by that number), leaves P unscaled, rescales each model's inverse kernel by its mean absolute
entry (which reweights ensemble members) and multiplies the averaged scores by the averaged Q. None of
this changes a single model's ranking; tests/test_baselines_trak.py reproduces traker's numbers to
float32 precision.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrace.baselines.similarity import check_details, document_captures, require_fitted
from pretrace.curvature.operators import check_damping
from pretrace.gradients.capture import compute_dtype
from pretrace.baselines.trak_ensemble import EnsembleSettings, Member, train_ensemble
from pretrace.errors import PretraceError
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.scores.pairwise import query_gradients
from pretrace.scores.result import ScoreResult
from pretrace.modeling.stage import DocumentSource, Stage, load_stage

PROJECTIONS = ("rademacher", "gaussian")


def check_projection(dim: int, kind: str) -> None:
    if dim < 1:
        raise PretraceError(f"--projection-dim must be at least 1, got {dim}.")
    if kind not in PROJECTIONS:
        raise PretraceError(f"unknown --projection {kind!r}; choose one of {', '.join(PROJECTIONS)}.")


class GradientProjector:
    """Projects per-module gradients `[B, d_out, d_in']` to `[B, k]` with a seeded random matrix.

    Row r of module `name` is projected by a `[d_in', k]` block drawn from its own generator seeded by
    (seed, member, name, r), so the matrix depends neither on the chunk size nor on the module order.
    Rows are processed `chunk_elements` matrix entries at a time; blocks are kept for reuse while they
    fit in `cache_bytes` and regenerated on every batch otherwise. Matrices are reproducible for a given
    seed on a given device type (CPU and CUDA generators draw different numbers).
    """

    def __init__(self, dim: int, kind: str = "rademacher", seed: int = 0, member: int = 0,
                 chunk_elements: int = 2**24, cache_bytes: int = 2**30):
        check_projection(dim, kind)
        self.dim, self.kind, self.seed, self.member = dim, kind, seed, member
        self.chunk_elements, self.cache_bytes = chunk_elements, cache_bytes
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    def row_seed(self, name: str, row: int) -> int:
        digest = hashlib.sha256(f"{self.seed}/{self.member}/{name}/{row}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def matrix(self, name: str, rows: range, d_in: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`[len(rows) * d_in, k]`: the projection of these rows of the module's `[d_out, d_in']` gradient."""
        key = (name, rows.start, rows.stop, d_in, str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        block = torch.empty(len(rows), d_in, self.dim, dtype=torch.float32, device=device)
        generator = torch.Generator(device=device)
        for offset, row in enumerate(rows):
            generator.manual_seed(self.row_seed(name, row))
            if self.kind == "gaussian":
                block[offset].normal_(generator=generator)
            else:
                block[offset].random_(0, 2, generator=generator).mul_(2).sub_(1)
        block = (block / self.dim**0.5).to(dtype).reshape(len(rows) * d_in, self.dim)
        if self._cached_bytes + block.nbytes <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += block.nbytes
        return block

    def project_module(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """`[B, d_out, d_in']` → `[B, k]`."""
        batch, d_out, d_in = grads.shape
        step = max(1, self.chunk_elements // (d_in * self.dim))
        out = grads.new_zeros(batch, self.dim)
        for start in range(0, d_out, step):
            rows = range(start, min(start + step, d_out))
            out += grads[:, rows.start:rows.stop].reshape(batch, -1) @ self.matrix(name, rows, d_in, grads.device, grads.dtype)
        return out

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over modules of their projections: the projection of the concatenated gradient."""
        return sum(self.project_module(name, g) for name, g in grads.items())


def document_features(stage: Stage, documents: DocumentSource, projector: GradientProjector) -> tuple[list[str], torch.Tensor]:
    """Φ `[N, k]`: projected loss gradients of every document, one module at a time."""
    dtype = compute_dtype(stage.model)
    ids, rows = [], []
    for batch, captured in document_captures(stage, documents, desc="TRAK features"):
        rows.append(sum(projector.project_module(t.name, captured.example_gradients(t.name).to(dtype)) for t in stage.tracked))
        ids.extend(batch.ids)
    return ids, torch.cat(rows)


def query_features(stage: Stage, queries, projector: GradientProjector) -> tuple[list[str], torch.Tensor]:
    """φ(x) `[Q, k]`: projected gradients of each query's measurement."""
    ids, grads = query_gradients(stage.model, stage.tracked, stage.query_batches(queries), progress=True)
    dtype = compute_dtype(stage.model)
    return ids, projector.project({t.name: grads[t.name].to(dtype) for t in stage.tracked})


def damped_inverse(features: torch.Tensor, damping: float | None, damping_factor: float) -> tuple[torch.Tensor, float]:
    """(ΦᵀΦ + λI)⁻¹ in float64 and λ (absolute, or relative to the mean eigenvalue trace(ΦᵀΦ)/k)."""
    phi = features.double()
    gram = phi.T @ phi
    damping = float(damping) if damping is not None else damping_factor * float(gram.diagonal().mean())
    check_damping(damping, None)
    gram.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise PretraceError(
            f"the TRAK kernel ΦᵀΦ + λI is singular (λ={damping:g}, {phi.shape[0]} documents, projection dimension {phi.shape[1]}); "
            "pass a positive --damping or --damping-factor, or a --projection-dim below the number of documents."
        )
    return torch.cholesky_inverse(factor), damping


@dataclass
class FittedModel:
    """One ensemble member after `fit`: where its queries and documents are differentiated, and its kernel."""

    query_stage: Stage
    document_stage: Stage
    projector: GradientProjector
    damping: float
    kernel: torch.Tensor  # (ΦᵀΦ + λI)⁻¹, [k, k] float64
    weighted_features: torch.Tensor  # Φ (ΦᵀΦ + λI)⁻¹, [N, k]


def _signature(stage: Stage) -> list[tuple]:
    return [(t.name, t.d_out, t.d_in_total, t.block_names) for t in stage.tracked]


class TRAK(Attributor):
    """TRAK over an ensemble of model folders, one trained in `fit` (`ensemble`), or over the scoring context's
    own model(s) when neither is given.

    Without members the one member is the context: single-stage, the model itself; multi-stage, queries on
    the fine-tuned model and documents (and the kernel) on the pre-trained one. Ensemble members are
    single-stage and all stay loaded between `fit` and `score`.
    """

    name = "trak"

    def __init__(self, model_paths: list[str] | None = None, projection_dim: int = 2048, projection: str = "rademacher",
                 seed: int = 0, damping: float | None = None, damping_factor: float = 0.1, ensemble: EnsembleSettings | None = None):
        check_projection(projection_dim, projection)
        if ensemble is not None and model_paths:
            raise PretraceError("give either --trak-models (trained ensemble folders) or --trak-ensemble N (train them now), not both.")
        self.model_paths = list(model_paths or [])
        self.ensemble = ensemble
        self.trained: list[Member] = []
        self.training_seconds = 0.0
        self.projection_dim, self.projection, self.seed = projection_dim, projection, seed
        self.damping, self.damping_factor = damping, damping_factor
        self.fitted: list[FittedModel] = []
        self.document_ids: list[str] = []
        self._fitted_on: DocumentSource | None = None

    def members(self, context: ScoringContext) -> list[tuple[Stage, Stage]]:
        if not self.model_paths:
            return [(context.query_stage, context.document_stage)]
        if context.query_stage is not context.document_stage:
            raise PretraceError("--trak-models lists single-stage ensemble members; score them with --model, not --pretrained/--finetuned.")
        base = context.document_stage
        members = []
        for path in self.model_paths:
            stage = load_stage(path, base.options, modules=[t.name for t in base.tracked])
            if _signature(stage) != _signature(base):
                raise PretraceError(f"{path}: its tracked modules differ from those of {base.path}; ensemble members must share the architecture.")
            if stage.tokenizer.get_vocab() != base.tokenizer.get_vocab():
                raise PretraceError(f"{path}: its tokenizer differs from that of {base.path}; ensemble members must tokenize the same way.")
            members.append((stage, stage))
        return members

    def fit(self, context: ScoringContext) -> None:
        """Train the ensemble if asked, featurize the documents and invert each member's kernel: TRAK's one-off cost."""
        if self.ensemble is not None:
            if context.query_stage is not context.document_stage:
                raise PretraceError("--trak-ensemble trains single-stage members; score with --model, not --pretrained/--finetuned.")
            started = time.perf_counter()
            self.trained = train_ensemble(self.ensemble, context.document_stage)
            self.training_seconds = time.perf_counter() - started
            self.model_paths = [str(member.path) for member in self.trained]
        self.fitted = []
        for index, (queries, documents) in enumerate(self.members(context)):
            projector = GradientProjector(self.projection_dim, self.projection, self.seed, member=index)
            self.document_ids, features = document_features(documents, context.documents, projector)
            kernel, damping = damped_inverse(features, self.damping, self.damping_factor)
            weighted = (features.double() @ kernel).to(features.dtype)
            self.fitted.append(FittedModel(queries, documents, projector, damping, kernel, weighted))
        self._fitted_on = context.documents

    def member_scores(self, context: ScoringContext) -> tuple[list[str], list[torch.Tensor]]:
        """Query ids and each member's τ_m `[Q, N]` (float64)."""
        require_fitted(self._fitted_on, context)
        scores = []
        for member in self.fitted:
            ids, features = query_features(member.query_stage, context.queries, member.projector)
            scores.append((features @ member.weighted_features.to(features.device).T).double().cpu())
        return ids, scores

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False) -> ScoreResult:
        check_details(self.name, per_module, per_token, module_scores=False)
        ids, scores = self.member_scores(context)
        names = [t.name for t in context.document_stage.tracked]
        timings = {"ensemble_training_seconds": self.training_seconds} if self.ensemble is not None else {}
        return ScoreResult(scores=torch.stack(scores).mean(0), query_ids=ids, document_ids=list(self.document_ids), module_names=names, timings=timings)

    def hyperparameters(self) -> dict:
        ensemble = None
        if self.ensemble is not None:
            ensemble = {**asdict(self.ensemble), "training_seconds": self.training_seconds,
                        "trained": [{"path": str(m.path), "documents": m.documents, "trained_now": m.trained_now,
                                     "train_seconds": m.train_seconds} for m in self.trained]}
        return {
            "models": [str(Path(p)) for p in self.model_paths] or ["(the scored model)"],
            "ensemble": ensemble,
            "projection_dim": self.projection_dim, "projection": self.projection, "projection_seed": self.seed,
            "projection_scale": "1/sqrt(projection_dim)",
            "projection_device": sorted({str(next(m.document_stage.model.parameters()).device.type) for m in self.fitted}),
            "damping": [m.damping for m in self.fitted], "damping_factor": self.damping_factor,
            "features": "projected gradients of the summed cross-entropy (Q = I)",
            "formula": "mean over models of phi(x)^T (Phi^T Phi + damping I)^-1 phi(z)",
        }


def ensemble_folder(method, out: str) -> str:
    """Where the ensemble's members are cached: --trak-ensemble-dir, by default OUT.trak-ensemble beside --out."""
    return method.ensemble_dir or str(Path(out).with_name(Path(out).name + ".trak-ensemble"))


def build_trak(method, damping, train: str, out: str) -> TRAK:
    """TRAK from its config (`pretrace.methods.config.TRAK`): the kernel damped by the run's --damping/--damping-factor,
    the ensemble (if any) trained on --trak-train-data (default: the scored documents) and cached beside --out."""
    ensemble = None
    if method.ensemble:
        ensemble = EnsembleSettings(method.ensemble, ensemble_folder(method, out), method.train_data or train, method.subset_fraction,
                                    method.epochs, method.lr, method.batch_size, method.seed, method.init)
    paths = [p.strip() for p in (method.models or "").split(",") if p.strip()]
    return TRAK(paths, method.projection_dim, method.projection, method.projection_seed, damping.absolute, damping.relative, ensemble=ensemble)
