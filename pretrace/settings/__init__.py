"""The settings dataclasses that become command-line flags, with the names their choices come from.

Torch-free, and low in the layers (only `pretrace.config` and `pretrace.errors` at import), so `pretrace COMMAND
--help` builds every flag without loading torch. Each is re-exported where it is used (`pretrace.data.records`,
`pretrace.modeling.stage`, `pretrace.training`, `pretrace.curvature`, `pretrace.scores.index`): those packages
import torch when imported, which is why these cannot live in them."""
