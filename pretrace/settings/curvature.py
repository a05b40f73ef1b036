"""How EK-FAC factors are fitted (`FitSettings`), torch-free so `pretrace fit --help` loads no torch;
`pretrace.curvature` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import MAX_SEED, option, validate


@dataclass
class FitSettings:
    fisher: str = option("true", choices=("true", "empirical"), help="Labels for the curvature: sampled from the model's own predictions (true Fisher, a Gauss-Newton estimate) or the data's tokens (empirical Fisher: both passes then capture the same gradients, so the first pass's are kept for the second when they fit in half the memory budget left over by the plan, and the model runs once).")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed for sampled labels; the same seed gives the same factors.")
    checkpoint_every: int = option(50, at_least=1, help="Save resumable running sums every this many batches.")
    diagonal: bool = option(False, help="Also store the diagonal of the per-document Fisher (for --method diagonal).")
    factor_dtype: str = option("float32", choices=("float32", "float64", "bfloat16", "float16"), help="Precision of the stored factors: bfloat16/float16 halve their disk and memory size (sums are accumulated and eigendecomposed in float64, and applied in the gradients' precision).")

    def __post_init__(self):
        validate(self)
