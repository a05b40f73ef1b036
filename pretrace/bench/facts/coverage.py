"""How much of the probed facts' world the corpus holds (the paper's Exp 2 step 8): a model can only have learnt a
fact from pre-training if its corpus names the fact's entities.

The paper counts the Wikidata ids of LAMA's subjects and objects and how many of them are articles of the
pre-training corpus. Here the corpus is the benchmark's own, and each match says what it compares:

- Wikidata ids (T-REx/LAMA, or a corpus whose records carry a `wikidata_id` field): an id is an *article* when a
  record is about it (T-REx's document `uri`, the `wikidata_id` field) and *mentioned* when any entity annotation
  of a record names it (T-REx's `entities` and triples);
- names (the bundled facts, which carry no ids; a folder benchmark without ids): an entity is an *article title*
  when one of its names is the title of a Wikipedia summary of the corpus, and a *surface form* when one of its
  names occurs in a corpus sentence. A name match is no id match: it can find a namesake, or miss a renamed entity.

Counts, per relation and overall: distinct subjects, distinct objects, distinct entities (both pooled), and
`both`: facts whose subject and object are both present.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from pretrace.bench.facts.benchmark import FactBenchmark
from pretrace.bench.facts.text import MentionFinder
from pretrace.bench.facts.trex_lama import ENTITY_PREFIX, iter_trex_documents, read_lama_facts
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar

ID_FIELD = "wikidata_id"


def count_coverage(facts: Iterable[tuple[str, str, str]], present: Collection[str]) -> dict:
    """Per relation and overall, how many of the facts' (relation, subject, object) entities are in `present`."""
    by_relation: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for relation, subject, obj in dict.fromkeys(facts):  # each fact once
        by_relation[relation].append((subject, obj))
    everything = [pair for pairs in by_relation.values() for pair in pairs]
    return {"overall": _row(everything, present), "relations": {r: _row(pairs, present) for r, pairs in sorted(by_relation.items())}}


def _row(pairs: list[tuple[str, str]], present: Collection[str]) -> dict:
    subjects, objects = {s for s, _ in pairs}, {o for _, o in pairs}
    both = sum(s in present and o in present for s, o in pairs)
    return {"facts": len(pairs), "subjects": _share(subjects, present), "objects": _share(objects, present),
            "entities": _share(subjects | objects, present), "both": {"total": len(pairs), "present": both, "share": both / len(pairs) if pairs else 0.0}}


def _share(entities: set[str], present: Collection[str]) -> dict:
    found = sum(e in present for e in entities)
    return {"total": len(entities), "present": found, "share": found / len(entities) if entities else 0.0}


def coverage_result(facts_label: str, facts: list[tuple[str, str, str]], matches: Mapping[str, tuple[str, str, Collection[str]]]) -> dict:
    """The stage's record: which facts, and per match (name -> (label, what is compared, entities present)) the counts."""
    if not facts:
        raise PretraceError("no facts to count the corpus coverage of; the benchmark holds none.")
    return {"facts": facts_label, "count": len(dict.fromkeys(facts)),
            "matches": {name: {"label": label, "compares": compares, **count_coverage(facts, present)} for name, (label, compares, present) in matches.items()}}


# -- Wikidata ids ---------------------------------------------------------------------------------


def _entity_id(value) -> str | None:
    """A Wikidata id from "Q90" or "http://www.wikidata.org/entity/Q90" (anything else: None)."""
    if not isinstance(value, str):
        return None
    value = value[len(ENTITY_PREFIX):] if value.startswith(ENTITY_PREFIX) else value
    return value if len(value) > 1 and value[0] == "Q" and value[1:].isdigit() else None


def record_entity_ids(record: dict) -> tuple[set[str], set[str]]:
    """A corpus record's article ids (its `wikidata_id` field, T-REx's document `uri`/`docid`) and every id it names
    (those, plus T-REx's `entities` annotations and its triples' subjects and objects)."""
    given = record.get(ID_FIELD)
    articles = {i for i in map(_entity_id, given if isinstance(given, list) else [given]) if i}
    articles |= {i for i in (_entity_id(record.get("uri")), _entity_id(record.get("docid"))) if i}
    named = set(articles)
    for entity in record.get("entities") or ():
        named.add(_entity_id(entity.get("uri")) if isinstance(entity, dict) else None)
    for triple in record.get("triples") or ():
        for part in ("subject", "object"):
            named.add(_entity_id((triple.get(part) or {}).get("uri")) if isinstance(triple, dict) else None)
    named.discard(None)
    return articles, named


def corpus_entity_ids(records: Iterable[dict]) -> tuple[set[str], set[str]]:
    """Article ids and named ids over all records."""
    articles: set[str] = set()
    named: set[str] = set()
    for record in records:
        a, n = record_entity_ids(record)
        articles |= a
        named |= n
    return articles, named


def id_matches(articles: set[str], named: set[str], corpus: str) -> dict[str, tuple[str, str, set[str]]]:
    matches = {"articles": (f"an article of {corpus}", "Wikidata id", articles)}
    if named - articles:
        matches["mentions"] = (f"named by an entity annotation of {corpus}", "Wikidata id", named)
    return matches


def trex_lama_coverage(trex: str | Path, lama: str | Path) -> dict:
    """LAMA's T-REx facts (all of them, not only those with an evidence sentence) against the T-REx corpus's ids."""
    facts = [(f.relation, f.subject_id, f.object_id) for f in read_lama_facts(lama)]
    documents = progress_bar(iter_trex_documents(trex), desc="T-REx entity ids", unit="doc", leave=False)
    articles, named = corpus_entity_ids(document for _, _, document in documents)
    return coverage_result(f"all {len(dict.fromkeys(facts)):,} LAMA T-REx facts (subject and object Wikidata ids)", facts, id_matches(articles, named, "T-REx"))


# -- names ----------------------------------------------------------------------------------------


def name_matches(names: Mapping[str, Iterable[str]], titles: Iterable[str] | None, sentences: Iterable[str]) -> dict[str, tuple[str, str, set[str]]]:
    """Entities (key -> its names) found by name: as an article title (when `titles` are known) and in the sentences."""
    finder = MentionFinder(names)
    named: set[str] = set()
    for text in progress_bar(sentences, desc="entity names in the corpus", unit="sentence", leave=False):
        named |= finder.mentions(text)
    matches = {}
    if titles is not None:
        titles = set(titles)
        matches["titles"] = ("a Wikipedia summary's title (name match, not a Wikidata id)", "name",
                             {key for key, aliases in names.items() if any(a in titles for a in aliases)})
    matches["surface_forms"] = ("named in a corpus sentence (surface-form match, not a Wikidata id)", "name", named)
    return matches


def bundled_coverage(benchmark: FactBenchmark) -> dict:
    """Every candidate fact of the bundled set (not only those with an evidence sentence), matched by name."""
    from pretrace.bench.facts.bundled import wiki_paragraphs
    from pretrace.bench.facts.bundled_facts import bundled_fact_source

    source = bundled_fact_source()
    facts = [(t.relation, t.subject, t.object) for t in source.triples]
    names = {entity: aliases | {entity} for entity, aliases in source.aliases.items()}
    matches = name_matches(names, (title for title, _ in wiki_paragraphs()), benchmark.texts)
    return coverage_result(f"all {len(dict.fromkeys(facts)):,} candidate facts of the bundled set (entity names; they carry no Wikidata ids)", facts, matches)


def folder_coverage(benchmark: FactBenchmark, records: list[dict]) -> dict:
    """A benchmark folder's facts: by Wikidata id when its corpus records carry one, else by the facts' names."""
    facts = [(f.relation, f.subject_key, f.object_key) for f in benchmark.facts]
    articles, named = corpus_entity_ids(records)
    if articles or named:
        return coverage_result(f"the benchmark's {len(facts):,} facts (subject and object Wikidata ids)", facts, id_matches(articles, named, "the corpus"))
    names: dict[str, set[str]] = defaultdict(set)
    for fact in benchmark.facts:
        names[fact.subject_key].add(fact.subject)
        names[fact.object_key].add(fact.object)
    matches = name_matches(names, None, benchmark.texts)
    return coverage_result(f"the benchmark's {len(facts):,} facts (their corpus records carry no {ID_FIELD}: names)", facts, matches)


# -- reports --------------------------------------------------------------------------------------


def _cell(count: dict) -> str:
    return f"{count['present']:,}/{count['total']:,} ({100 * count['share']:.1f}%)"


def coverage_lines(result: dict) -> list[str]:
    """The facts counted, then one line per match, for the build's printout."""
    return [f"corpus coverage of {result['facts']}:", *(f"  {match['label']}: subjects {_cell(match['overall']['subjects'])}, objects "
                                                         f"{_cell(match['overall']['objects'])}, facts with both {_cell(match['overall']['both'])}"
                                                         for match in result["matches"].values())]


def coverage_markdown(result: dict) -> list[str]:
    """Overall and per relation: subjects, objects, facts with both, and entities present, per match."""
    matches = {name.replace("_", " "): match for name, match in result["matches"].items()}
    lines = ["### Corpus coverage of the facts' entities", "",
             f"Of {result['facts']}: how many subjects, objects and entities (distinct) the corpus holds, and how many facts have "
             "both their subject and their object there. " + "; ".join(f"**{name}**: {m['label']}" for name, m in matches.items()) + ".", "",
             "| relation | facts | " + " | ".join(f"{name}: subjects | {name}: objects | {name}: both | {name}: entities" for name in matches) + " |",
             "| --- | --- |" + " --- | --- | --- | --- |" * len(matches)]
    relations = next(iter(matches.values()))["relations"]
    for relation in ["overall", *relations]:
        rows = [m["overall"] if relation == "overall" else m["relations"][relation] for m in matches.values()]
        lines.append(f"| {relation} | {rows[0]['facts']:,} | " + " | ".join(f"{_cell(r['subjects'])} | {_cell(r['objects'])} | {_cell(r['both'])} | {_cell(r['entities'])}"
                                                                         for r in rows) + " |")
    return [*lines, ""]
