"""The multi-stage LDS benchmark's settings."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, option, positive_numbers, validate
from pretrace.errors import PretraceError


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
        return positive_numbers("--alphas", self.alphas, "1e-1,1e-3")
