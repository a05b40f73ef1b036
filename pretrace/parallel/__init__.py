"""Scaling out over processes with torch.distributed: `torchrun --nproc-per-node N -m pretrace ...`.

Work is split by *batch*: batch i (in the data's order) goes to rank i % world. Every rank still reads
and batches the whole stream, so batches (their documents, padding and sampled-label seeds) are exactly
those of a single-process run, and results differ from it only in the order float64 sums are added.
Fitting all-reduces its running sums at the end of each pass; scoring gathers every rank's score
columns back into document order (`pretrace.scores.plan` says whether documents or queries are split);
fine-tuning splits every batch's sequences and all-reduces gradients. A single process (no
WORLD_SIZE > 1) never touches torch.distributed: sharding, reductions and gathers are then the identity.

- `group`: joining the process group, this process's rank and device, barriers.
- `collectives`: sums, gathers and broadcasts over ranks, and which rank takes which item.

Only rank 0 writes folders and shows output: `group.initialize` silences stdout and warnings on other
ranks. A rank that fails exits non-zero, and torchrun then stops the others instead of leaving them waiting.
"""
