"""The quality-vs-cost benchmark's settings and the presets of sizes it chooses from."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, option, validate


@dataclass(frozen=True)
class ModelSize:
    """The GPT-NeoX trained from scratch on PTB."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocab_size: int | None  # None: the GPT-NeoX-20B tokenizer; else a BPE of that size trained on PTB
    max_length: int


@dataclass(frozen=True)
class Training:
    train_sentences: int | None  # None: all of PTB train
    epochs: int
    lr: float
    batch_size: int
    validation_sentences: int = 1000


@dataclass(frozen=True)
class Problem:
    """The queries, their candidate pool, the fitting set and the LDS subsets every method is measured on."""

    queries: int
    candidates: int
    fit_documents: int
    lds_subsets: int
    score_batch_size: int = 16
    label_samples: int = 8  # sampled labels per fitting token for EK-FAC's true Fisher


@dataclass(frozen=True)
class Solvers:
    """The ground truth's and each method's budget."""

    damping: float
    tolerance: float
    ground_truth_iterations: int
    cg_iterations: tuple[int, ...]
    lissa_depths: tuple[int, ...]
    arnoldi_rank: int
    arnoldi_iterations: int
    trak_models: int
    projection_dim: int
    # ekfac-cg: CG on the ground truth's system preconditioned by EK-FAC, damped like EK-FAC's held-out choice
    refined_iterations: tuple[int, ...] = (2, 3, 4, 6, 8)
    damping_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # EK-FAC damping candidates, × the ground truth's
    damping_sentences: int = 16  # held-out validation sentences the EK-FAC damping is chosen on


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; `paper` is the seed's experiment, the others shrink it."""

    model: ModelSize
    training: Training
    problem: Problem
    solvers: Solvers


PRESETS = {
    "paper": Preset(ModelSize(256, 2, 2, 1024, None, 512), Training(None, 3, 1e-3, 32), Problem(10, 500, 32, 50),
                    Solvers(1e-4, 1e-6, 2000, (50, 500, 1000), (500, 2000, 5000, 10000), 20, 200, 10, 4096)),
    # Per-query costs keep the paper's proportions: one Gauss-Newton product over the fitting set (the paper:
    # 32 x 512 tokens) costs about as much as the gradients of one query's candidates (500 sentences), so here
    # 96 fitting sentences against 100 candidates. The pool (10 x 100) is half the training set; the LDS
    # retrains on the other half plus random halves of the pool.
    "cpu": Preset(ModelSize(64, 2, 2, 256, 2000, 48), Training(2000, 2, 3e-3, 32), Problem(10, 100, 96, 50),
                  Solvers(1e-2, 1e-3, 500, (5, 20, 100), (50, 200), 20, 60, 4, 1024)),
    "micro": Preset(ModelSize(32, 1, 2, 64, 320, 24), Training(200, 1, 3e-3, 16, validation_sentences=50),
                    Problem(2, 8, 8, 4, score_batch_size=8, label_samples=2),
                    Solvers(1e-2, 1e-3, 200, (2,), (4,), 3, 6, 2, 32, refined_iterations=(2,), damping_sentences=4)),
}


@dataclass
class QualityVsCostSettings:
    preset: str = option("cpu", choices=tuple(PRESETS), help="Sizes: 'paper' (the seed's toy GPT-NeoX, for a GPU), 'cpu' (a smaller model and BPE, under an hour on 2 cores) or 'micro' (seconds; tests).")
    out: str = option("runs/quality-vs-cost", help="Working folder; every stage is cached there and a re-run resumes.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of sampling, training, fitting and projections.")
    device: str = option("auto", help="'cpu', 'cuda', ... or 'auto'.")

    def __post_init__(self):
        from pretrace.parallel.group import check_device  # torch: only once settings are made, never for --help

        validate(self)
        check_device(self.device)
