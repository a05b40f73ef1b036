"""Attribution methods behind one interface: `fit` pays the one-off cost, `score` the per-query cost.

`pretrace.methods.registry` maps method names to builders; it sits above `pretrace.baselines` (which build on
`methods.base`), so it is imported from there, not from this package."""

from pretrace.methods.base import Attributor, ScoringContext

__all__ = ["Attributor", "ScoringContext"]
