"""The settings of `pretrace demo` and of the `pretrace bench` benchmarks (with the presets they choose from),
torch-free so their `--help` loads no torch; each benchmark's module re-exports its own."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, option, validate
from pretrace.errors import PretraceError


@dataclass
class DemoSettings:
    out: str = option("runs/demo", help="Working folder; every stage is cached there.")
    ptb_sentences: int = option(8000, at_least=1, help="Penn Treebank training sentences in the pre-training corpus.")
    facts: int = option(60, at_least=2, help="Capital facts stated in the pre-training corpus (some fine-tuned on, some asked).")
    query_facts: int = option(20, at_least=1, help="Facts held out of fine-tuning and asked as queries.")
    fact_repeats: int = option(4, at_least=1, help="Copies of each fact sentence in the pre-training corpus.")
    candidates: int = option(500, at_least=0, help="Random pre-training sentences scored besides the fact sentences.")
    epochs: int = option(3, at_least=1, help="Pre-training epochs.")
    fit_documents: int = option(2000, at_least=1, help="Pre-training documents (a random sample) the pre-trained curvature is fitted on.")
    alpha: float = option(0.01, above=0, help="Proximity strength α of fine-tuning.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed for sampling, training and fitting.")

    def __post_init__(self):
        """Checked before pre-training starts: a bad value would otherwise fail (or slice the corpus) minutes later."""
        validate(self)
        if self.query_facts >= self.facts:
            raise PretraceError(f"--query-facts must be below --facts={self.facts} (the rest are fine-tuned on), got {self.query_facts}.")
        if self.candidates > self.ptb_sentences:
            raise PretraceError(f"--candidates must be at most --ptb-sentences={self.ptb_sentences}, got {self.candidates}.")


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


@dataclass
class MultiStageLDSSettings:
    out: str = option("runs/multistage-lds", help="Working folder; every stage is cached there and a re-run resumes.")
    pool: int = option(64, at_least=4, help="Pre-training documents the random halves are drawn from (and every method scores).")
    kept: int = option(32, at_least=0, help="Pre-training documents every model also trains on.")
    subsets: int = option(50, at_least=2, help="Random halves of the pool retrained (per seed).")
    queries: int = option(24, at_least=2, help="Held-out examples of the fine-tuned rule whose loss is measured.")
    pairs: int = option(24, at_least=1, help="Fine-tuning prompt/completion pairs.")
    alphas: str = option("1e-1,1e-3", help="Comma-separated proximity strengths α of fine-tuning (each a fine-tune per retrained model).")
    weight_decay: float = option(1e-2, above=0, help="Pre-training's L2 term w/2‖θ‖² (H_pt's damping).")
    pretrain_steps: int = option(300, at_least=1, help="Full-batch Adam steps of pre-training.")
    finetune_steps: int = option(200, at_least=1, help="Full-batch Adam steps of fine-tuning.")
    lr: float = option(1e-2, above=0, help="Peak learning rate of both stages (warm-up, then cosine).")
    hidden_size: int = option(16, at_least=2, help="Width of the toy GPT-NeoX (2 layers, 2 heads: even).")
    refine_iterations: int = option(4, at_least=1, help="Iterations of ekfac-cg (per inverse): the method's default.")
    projection_dim: int = option(512, at_least=1, help="TRAK's projection dimension.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of the corpus, the subsets and the main models.")
    seeds_per_subset: int = option(1, at_least=1, help="Retrainings averaged per subset (seeds --seed, --seed + 1, ...); the noise ceiling averages as many further seeds. More seeds lower the seed noise the measured effects carry.")
    threads: int = option(1, at_least=1, help="Torch threads: the toy model's operations are too small to share (2 threads were 60x slower than 1 beside another job).")

    def __post_init__(self):
        validate(self)
        if self.hidden_size % 2:
            raise PretraceError(f"--hidden-size {self.hidden_size} must be even: the toy model has 2 attention heads.")
        self.alpha_values  # noqa: B018 -- refused now, before any work

    @property
    def alpha_values(self) -> list[float]:
        try:
            values = [float(part) for part in self.alphas.split(",") if part.strip()]
        except ValueError:
            raise PretraceError(f"--alphas {self.alphas!r}: pass comma-separated numbers, e.g. 1e-1,1e-3.") from None
        if not values or any(not v > 0 for v in values) or len({f"{v:g}" for v in values}) != len(values):
            raise PretraceError(f"--alphas {self.alphas!r}: pass one or more distinct positive proximity strengths.")
        return values
