"""Sentence splitting and entity-mention finding for the bundled fact benchmark.

Mentions are found on word tokens, so punctuation never matters ("U.S." and "U. S." are the same
tokens; "France's" contains "France"), and leftmost-longest matching makes "Papua New Guinea" one
mention rather than also a mention of "Guinea". Matching is exact-case on the aliases given: callers
add lowercase variants only for common nouns (currencies), so "Nice" is not "nice" and "Won" not "won".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

WORD = re.compile(r"\w+")

# Words that end with a period without ending the sentence (compared lowercase, without the period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt ft jr sr gen col lt sgt capt cmdr adm gov sen rep rev hon pres "
    "no nos vol vols fig figs pp ed eds est approx ca cf vs etc al inc ltd co corp bros dept univ "
    "jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e a.d b.c c b d fl r".split()
)
# A sentence ends at . ! or ? (plus closing quotes/brackets), then space, then an uppercase letter, digit or opening quote.
_BOUNDARY = re.compile(r"""[.!?]['"”’)\]]*\s+(?=["“‘(\[]?[A-Z0-9À-Þ])""")
_LAST_WORD = re.compile(r"(\S+)$")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; abbreviations ("Dr.", "c.") and initials ("Arthur C. Clarke") do not end one."""
    sentences: list[str] = []
    for paragraph in text.splitlines():
        start = 0
        for boundary in _BOUNDARY.finditer(paragraph):
            if _is_abbreviation(paragraph[start:boundary.start() + 1]):
                continue
            sentences.append(paragraph[start:boundary.end()].strip())
            start = boundary.end()
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def _is_abbreviation(chunk: str) -> bool:
    """Whether the chunk's final period belongs to an abbreviation or an initial rather than ending it."""
    if not chunk.endswith("."):
        return False
    match = _LAST_WORD.search(chunk[:-1])
    if match is None:
        return False
    word = match.group(1).lstrip("(\"'“‘[")
    last_part = word.rsplit(".", 1)[-1]
    return word.lower() in ABBREVIATIONS or (len(last_part) == 1 and last_part.isalpha() and last_part.isupper())


def word_tokens(text: str) -> tuple[str, ...]:
    return tuple(WORD.findall(text))


class MentionFinder:
    """Finds which entities a text names, from entity -> alias strings (leftmost-longest, exact case)."""

    def __init__(self, aliases: Mapping[str, Iterable[str]]):
        self._entities: dict[tuple[str, ...], set[str]] = defaultdict(set)
        self._longest: dict[str, int] = {}
        for entity, names in aliases.items():
            for name in names:
                tokens = word_tokens(name)
                if not tokens:
                    continue
                self._entities[tokens].add(entity)
                self._longest[tokens[0]] = max(self._longest.get(tokens[0], 0), len(tokens))

    def mentions(self, text: str) -> set[str]:
        tokens = word_tokens(text)
        found: set[str] = set()
        position = 0
        while position < len(tokens):
            step = 1
            for length in range(min(self._longest.get(tokens[position], 0), len(tokens) - position), 0, -1):
                entities = self._entities.get(tokens[position:position + length])
                if entities:
                    found |= entities
                    step = length
                    break
            position += step
        return found
