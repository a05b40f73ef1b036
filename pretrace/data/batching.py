"""Tokenization and padding with an explicit loss mask.

`target_mask[b, t]` is True when token t is a loss target, i.e. it is predicted by position t-1.
Documents target every token but the first; queries target only their completion tokens (or the whole
text when there is no completion). `predict_mask` is the same mask moved to the predicting positions,
which is where logits, sampled labels and curvature statistics live.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError


@dataclass(frozen=True)
class Encoded:
    id: str
    input_ids: list[int]
    target_mask: list[bool]


@dataclass
class TokenBatch:
    ids: list[str]
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    target_mask: torch.Tensor  # [B, T] bool

    @property
    def predict_mask(self) -> torch.Tensor:
        """[B, T] bool: positions whose next token is a target."""
        mask = torch.zeros_like(self.target_mask)
        mask[:, :-1] = self.target_mask[:, 1:]
        return mask

    @property
    def next_tokens(self) -> torch.Tensor:
        """[B, T] long: the token each position predicts (0 where nothing is predicted)."""
        nxt = torch.zeros_like(self.input_ids)
        nxt[:, :-1] = self.input_ids[:, 1:]
        return nxt * self.predict_mask

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.ids, self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def __len__(self) -> int:
        return len(self.ids)


class _TruncationReport:
    """Counts truncated sequences and warns once, with the count, when the stream ends."""

    def __init__(self, what: str, max_length: int):
        self.what, self.max_length, self.truncated, self.total = what, max_length, 0, 0

    def clip(self, ids: list[int]) -> list[int]:
        self.total += 1
        if len(ids) > self.max_length:
            self.truncated += 1
            return ids[: self.max_length]
        return ids

    def close(self) -> None:
        if self.truncated:
            warnings.warn(
                f"{self.truncated} of {self.total} {self.what} were longer than --max-length={self.max_length} tokens and were truncated.",
                stacklevel=3,
            )


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


SHORT_DOCUMENTS = ("raise", "skip", "keep")


def encode_documents(tokenizer, documents: Iterable[Document], max_length: int, short: str = "raise") -> Iterator[Encoded]:
    """Documents target every token but the first, so one needs at least 2 tokens. A shorter one (common in real
    corpora) is refused (`short="raise"`), left out with one counted warning at the end ("skip": fitting), or kept
    with no target ("keep": its gradient and so its score are 0, and document positions stay aligned)."""
    if short not in SHORT_DOCUMENTS:
        raise PretraceError(f"short={short!r} is not one of {list(SHORT_DOCUMENTS)}.")
    report = _TruncationReport("documents", max_length)
    skipped = 0
    for doc in documents:
        ids = report.clip(_tokenize(tokenizer, doc.text, add_special_tokens=True))
        if len(ids) < 2:
            if short == "raise":
                raise PretraceError(f"document {doc.id!r} has fewer than 2 tokens; a language-modelling loss needs at least one predicted token.")
            if short == "skip":
                skipped += 1
                continue
            ids = ids or [pad_token_id(tokenizer)]
            yield Encoded(doc.id, ids, [False] * len(ids))
            continue
        yield Encoded(doc.id, ids, [False] + [True] * (len(ids) - 1))
    report.close()
    if skipped:
        warnings.warn(f"{skipped} of {report.total} documents had fewer than 2 tokens (nothing to predict) and were skipped.", stacklevel=2)


def short_document_ids(tokenizer, documents: Iterable[Document]) -> list[str]:
    """Ids of the documents with fewer than 2 tokens: their score is 0 by definition (`encode_documents(short="keep")`)."""
    return [doc.id for doc in documents if len(_tokenize(tokenizer, doc.text, add_special_tokens=True)) < 2]


def encode_queries(tokenizer, queries: Iterable[Query], max_length: int) -> Iterator[Encoded]:
    """Prompt and completion are tokenized separately and joined, so the completion's tokens are exact."""
    report = _TruncationReport("queries", max_length)
    for query in queries:
        prompt_ids = _tokenize(tokenizer, query.prompt, add_special_tokens=True)
        if query.completion is None:
            ids = report.clip(prompt_ids)
            if len(ids) < 2:
                raise PretraceError(f"query {query.id!r} has fewer than 2 tokens, so there is nothing to measure; give a longer 'text', or a 'prompt' and its 'completion'.")
            yield Encoded(query.id, ids, [False] + [True] * (len(ids) - 1))
            continue
        completion_ids = _tokenize(tokenizer, query.completion, add_special_tokens=False)
        if not prompt_ids:
            raise PretraceError(f"query {query.id!r}: the prompt encodes to no tokens, so nothing predicts the first completion token.")
        ids = report.clip(prompt_ids + completion_ids)
        mask = [False] * len(prompt_ids) + [True] * len(completion_ids)
        mask = mask[: len(ids)]
        if not any(mask):
            raise PretraceError(f"query {query.id!r}: the prompt alone fills --max-length={report.max_length}; no completion token is left to measure.")
        yield Encoded(query.id, ids, mask)
    report.close()


def collate(items: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> TokenBatch:
    if padding_side not in ("right", "left"):
        raise PretraceError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    length = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    target = torch.zeros((len(items), length), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(item.input_ids, dtype=torch.long)
        attention[row, span] = 1
        target[row, span] = torch.tensor(item.target_mask, dtype=torch.bool)
    return TokenBatch([item.id for item in items], input_ids, attention, target)


def iter_batches(encoded: Iterable[Encoded], batch_size: int, pad_id: int, padding_side: str = "right") -> Iterator[TokenBatch]:
    if batch_size < 1:
        raise PretraceError(f"batch size must be at least 1, got {batch_size}.")
    chunk: list[Encoded] = []
    for item in encoded:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield collate(chunk, pad_id, padding_side)
            chunk = []
    if chunk:
        yield collate(chunk, pad_id, padding_side)


def pad_token_id(tokenizer) -> int:
    """The id padding positions hold: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
