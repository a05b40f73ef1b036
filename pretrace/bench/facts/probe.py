"""LAMA-style probing: does a model know a fact's answer? (the paper's top-k accuracy of both models)

A query's answer rank is, under teacher forcing, the worst rank any completion token gets in the
model's next-token distribution (rank 1 = the most likely token; ties count against the answer). The
answer is "in the top k" when that rank is at most k: every token of the object is among the model's
k best guesses, so for k = 1 it is exactly what greedy decoding would produce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrace.data.batching import encode_queries, iter_batches, pad_token_id
from pretrace.data.records import Query
from pretrace.errors import PretraceError
from pretrace.gradients.task import token_logits
from pretrace.progress import progress_bar


@torch.no_grad()
def answer_ranks(model: torch.nn.Module, tokenizer, queries: Sequence[Query], batch_size: int = 8, max_length: int = 512,
                 progress: bool = True) -> dict[str, int]:
    """Query id -> the worst rank (1-based) of its completion tokens given the prompt and earlier completion tokens."""
    if any(query.completion is None for query in queries):
        raise PretraceError("answer ranks need queries with a completion (the answer to probe for).")
    device = next(model.parameters()).device
    batches = iter_batches(encode_queries(tokenizer, queries, max_length), batch_size, pad_token_id(tokenizer))
    ranks: dict[str, int] = {}
    for batch in progress_bar(batches, total=-(-len(queries) // batch_size), desc="probing answers", unit="batch", enabled=progress, leave=False):
        batch = batch.to(device)
        logits = token_logits(model, batch).float()  # position t predicts token t + 1
        gold_logit = logits.gather(-1, batch.next_tokens.unsqueeze(-1))
        token_rank = (logits > gold_logit).sum(-1) + 1  # [B, T]
        worst = torch.where(batch.predict_mask, token_rank, torch.zeros_like(token_rank)).max(-1).values
        ranks.update(zip(batch.ids, (int(r) for r in worst.cpu())))
    return ranks


def top_k_accuracy(ranks: Sequence[int], k: int) -> float:
    """Share of answers whose rank is at most k."""
    if not ranks:
        raise PretraceError("no answer ranks to average; probe at least one query.")
    if k < 1:
        raise PretraceError(f"k={k}; pass a positive cut-off.")
    return sum(1 for rank in ranks if rank <= k) / len(ranks)
