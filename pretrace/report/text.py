"""Tokenizer pieces back to readable text, grouped into words so the report shades what a reader sees.

The report has no tokenizer, only the pieces `convert_ids_to_tokens` stored (`Ġcapital`, `▁Paris`, `<0x0A>`), so it
decodes them itself: GPT-2's byte-level alphabet as UTF-8 across token boundaries, else BPE markers one piece at a
time. Shading one sub-word piece (`Ġt` `ar` `aw` `a`) reads as noise; a word's pieces are summed and shaded together.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

_BYTE_TOKEN = re.compile(r"<0x([0-7][0-9A-Fa-f])>")
_BPE_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
_SPACES = re.compile(r"\s*")
_SPECIAL_TOKEN = re.compile(r"</?\|?[A-Za-z_][\w.-]*\|?>")  # <s>, </s>, <|endoftext|>: scored, but not in the text


@dataclass(frozen=True)
class Word:
    """Consecutive tokens read as one word: its leading whitespace (left unshaded), its text, the summed score."""

    space: str
    text: str
    score: float
    pieces: tuple[tuple[str, float], ...]  # each token's decoded text and score, for the tooltip


def display_token(token: str) -> str:
    """A tokenizer piece as the text it stands for: BPE space/newline markers and ASCII byte tokens decoded."""
    token = _BYTE_TOKEN.sub(lambda match: chr(int(match.group(1), 16)), token)
    return token.translate(_BPE_MARKERS)


def _byte_level_alphabet() -> Mapping[str, int]:
    """GPT-2's byte-level BPE alphabet (also Llama 3's, SmolLM's): printable Latin-1 bytes stand for themselves,
    the other bytes for the code points 256, 257, ... in byte order (space -> 'Ġ', 0xA0 -> 'ł')."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [byte for byte in range(256) if byte not in visible]
    return MappingProxyType({**{chr(byte): byte for byte in visible}, **{chr(256 + n): byte for n, byte in enumerate(hidden)}})


_BYTE_LEVEL = _byte_level_alphabet()  # read-only


def display_tokens(tokens: list[str]) -> list[str]:
    """Each token's text. Byte-level BPE pieces are decoded as UTF-8 across token boundaries, so a character split
    over two tokens (é, non-breaking space) shows once, on the token that completes it; other vocabularies
    (SentencePiece '▁', word-level) go through `display_token` one piece at a time."""
    if not all(char in _BYTE_LEVEL for token in tokens for char in token):
        return [display_token(token) for token in tokens]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [utf8.decode(bytes(_BYTE_LEVEL[char] for char in token)) for token in tokens]


def token_texts(tokens: list[str], text: str | None = None) -> tuple[list[str], str]:
    """Each token's text as `text` has it, with the whitespace before it, and the text after the last token (past
    --max-length). A word-level vocabulary stores no spaces, so the document's own spacing is used; where the tokens
    do not spell `text` (a special token, a normalising tokenizer) they keep their decoded text and nothing follows."""
    pieces = display_tokens(tokens)
    if text is None:
        return pieces, ""
    aligned, position = [], 0
    for piece in pieces:
        core = piece.strip()
        start = _SPACES.match(text, position).end()
        if core and not text.startswith(core, start):
            if _SPECIAL_TOKEN.fullmatch(core):
                aligned.append(core)
                continue
            return pieces, ""
        end = start + len(core) if core else position + (len(piece) if text.startswith(piece, position) else 0)
        aligned.append(text[position:end])
        position = end
    return aligned, text[position:]


def words(pieces: list[str], scores: list[float]) -> list[Word]:
    """Token texts (`token_texts`) grouped into words (letters and digits run on; whitespace and punctuation start a
    new word), each with the sum of its tokens' scores: the words still sum to the document's score."""
    groups: list[list[tuple[str, float]]] = []
    for text, score in zip(pieces, scores):
        if groups and _continues(groups[-1][-1][0], text):
            groups[-1].append((text, score))
        else:
            groups.append([(text, score)])
    return [_word(group) for group in groups]


def _continues(previous: str, text: str) -> bool:
    """Whether `text` goes on the word `previous` ended: an empty piece (half a character) or letters after letters."""
    if not text or not previous:
        return True
    return _is_word_char(previous[-1]) and _is_word_char(text[0])


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _word(group: list[tuple[str, float]]) -> Word:
    text = "".join(piece for piece, _ in group)
    body = text.lstrip()
    space = text[: len(text) - len(body)] if body else ""  # a whitespace-only token is its own, shadable, word
    return Word(space, body or text, sum(score for _, score in group), tuple(group))
