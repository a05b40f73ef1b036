"""Explanations of (query, document) pairs: the per-token and per-module contributions of a score, kept by the
scoring pass or taken by rescoring the pairs' documents, and the rows top_k.jsonl and results.jsonl store them in."""

from __future__ import annotations

from dataclasses import replace

import torch

from pretrace.data.records import iter_documents
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.scores.explanations import Explanation
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.result import ScoreResult, top_indices


def explain_pairs(attributor: Attributor, context: ScoringContext, pairs: list[tuple[int, int]],
                  streamed: dict[tuple[int, int], Explanation] | None = None) -> dict[tuple[int, int], Explanation]:
    """Explanations of these (query, document) pairs: those the scoring pass kept, and the rest by rescoring their
    documents as a small subset (pairs a pass cannot keep: scores from --index or from a cache, a float32 rounding
    at the k-th place with --scores-on-disk, a too-short document scored 0 afterwards, another top asked of the pass)."""
    streamed = streamed or {}
    found = {pair: streamed[pair] for pair in pairs if pair in streamed}
    wanted = sorted({document for _, document in (pair for pair in pairs if pair not in found)})
    if not wanted:
        return found
    chosen = set(wanted)
    subset = [doc for i, doc in enumerate(iter_documents(context.documents, context.options.fields())) if i in chosen]
    sub = replace(context, documents=subset, plan=ScoringPlan(context.plan.split))  # split as the run, scores in RAM
    detail = attributor.score(sub, per_module=True, per_token=True)
    column = {index: c for c, index in enumerate(wanted)}
    for q, index in pairs:
        if (q, index) not in found:
            c = column[index]
            found[(q, index)] = Explanation(detail.document_token_ids[c], detail.per_token[c][q],
                                            {name: float(detail.per_module[m, q, c]) for m, name in enumerate(detail.module_names)})
    return found


def explain_top(attributor: Attributor, context: ScoringContext, result: ScoreResult, k: int, explained: bool
                ) -> tuple[torch.Tensor, list[tuple[int, int]], dict[tuple[int, int], Explanation] | None]:
    """Each query's top `k` documents (`[Q, k]` indices), the (query, document) pairs they make and, when
    `explained`, those pairs' explanations (kept by the scoring pass in `result.explanations`, or rescored)."""
    top = top_indices(result.scores, k)
    if not explained:
        return top, [], None
    pairs = top_pairs(top)
    return top, pairs, explain_pairs(attributor, context, pairs, result.explanations)


def explanation_counts(pairs: list[tuple[int, int]], streamed: dict | None) -> dict[str, int]:
    """How many explained pairs the scoring pass kept and how many needed their documents rescored."""
    kept = sum(pair in (streamed or {}) for pair in pairs)
    return {"pairs": len(pairs), "from_scoring_pass": kept, "rescored": len(pairs) - kept}


def top_pairs(top: torch.Tensor) -> list[tuple[int, int]]:
    """(query, document) for every entry of `[Q, k]` top indices."""
    return [(q, index) for q, row in enumerate(top.tolist()) for index in row]


def explanation_fields(explanation: Explanation, tokenizer) -> dict:
    """A top document's `tokens`, `token_scores` and `module_scores`, as top_k.jsonl and results.jsonl store them."""
    return {"tokens": tokenizer.convert_ids_to_tokens(explanation.token_ids), "token_scores": explanation.token_scores.tolist(),
            "module_scores": dict(explanation.module_scores)}


def top_rows(context: ScoringContext, result: ScoreResult, top: torch.Tensor, details: dict[tuple[int, int], Explanation] | None) -> list[dict]:
    """top_k.jsonl's rows: per query its top documents with their text and, when given, their explanations."""
    wanted = set(top.flatten().tolist())
    texts = {i: doc.text for i, doc in enumerate(iter_documents(context.documents, context.options.fields())) if i in wanted}
    rows = []
    for q, query in enumerate(context.queries):
        documents = []
        for rank, index in enumerate(top[q].tolist(), start=1):
            entry = {"id": result.document_ids[index], "index": index, "score": float(result.scores[q, index]), "rank": rank, "text": texts[index]}
            if details is not None:
                entry.update(explanation_fields(details[(q, index)], context.document_stage.tokenizer))
            documents.append(entry)
        rows.append({"query_id": query.id, "prompt": query.prompt, "completion": query.completion or "", "documents": documents})
    return rows
