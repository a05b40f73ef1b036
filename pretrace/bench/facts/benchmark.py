"""The fact-tracing benchmark as data: an attribution set of sentences, facts asked as questions, and
which sentences state each fact (the ground truth an attribution method should rank first).

Sentence ids are their positions in the attribution set, so retrievers and score files (which index
documents by position) and ground truth share one numbering. Facts are keyed "relation,subject,object"
(Wikidata ids for T-REx/LAMA, names for the bundled set), the key format of the paper's fact_to_ids.json.

On disk (`write` / `read_benchmark`): corpus.jsonl (id, text, facts, source), facts.jsonl (fact_id,
subject, relation, object, question, prompt, completion, evidence_ids), relations.jsonl (question
templates), and, when split, split.json plus finetune.jsonl / queries.jsonl in pretrace's query format.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pretrace.bench.facts.templates import QuestionTemplate, format_prompt
from pretrace.errors import PretraceError
from pretrace.storage import read_json, read_jsonl_rows, write_json, write_jsonl

KEY_SEPARATOR = ","


def fact_key(relation: str, subject: str, obj: str) -> str:
    parts = (relation, subject, obj)
    if any(not part or KEY_SEPARATOR in part for part in parts):
        raise PretraceError(f"fact ({relation!r}, {subject!r}, {obj!r}): parts must be non-empty and contain no {KEY_SEPARATOR!r}.")
    return KEY_SEPARATOR.join(parts)


def split_fact_key(key: str) -> tuple[str, str, str]:
    parts = key.split(KEY_SEPARATOR)
    if len(parts) != 3:
        raise PretraceError(f"fact key {key!r}: expected 'relation,subject,object'.")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Sentence:
    id: int
    text: str
    facts: tuple[str, ...]  # keys of every fact aligned to this sentence (benchmark facts or not)
    source: str = ""  # where it came from, e.g. "<title>#<sentence index>"


@dataclass(frozen=True)
class Fact:
    fact_id: str  # fact_key(relation, subject id, object id)
    subject: str  # the subject's name as asked
    relation: str
    object: str  # the answer
    question: str
    evidence_ids: tuple[int, ...]  # sentences that state the fact (sorted)

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        return " " + self.object

    @property
    def retrieval_query(self) -> str:
        """The question with its answer: what the paper gives BM25 to fetch candidates for this fact."""
        return f"{self.question} {self.object}"

    @property
    def object_key(self) -> str:
        return split_fact_key(self.fact_id)[2]

    @property
    def subject_key(self) -> str:
        return split_fact_key(self.fact_id)[1]

    def to_dict(self) -> dict:
        return {
            "fact_id": self.fact_id, "subject": self.subject, "relation": self.relation, "object": self.object,
            "question": self.question, "prompt": self.prompt, "completion": self.completion, "evidence_ids": list(self.evidence_ids),
        }


@dataclass(frozen=True)
class FactSplit:
    """Fact ids used to fine-tune the model and fact ids queried for attribution (disjoint)."""

    finetune: tuple[str, ...]
    queries: tuple[str, ...]
    seed: int
    query_fraction: float

    def __post_init__(self) -> None:
        overlap = set(self.finetune) & set(self.queries)
        if overlap:
            raise PretraceError(f"split: {len(overlap)} facts are both fine-tuning and query facts (e.g. {sorted(overlap)[0]!r}); they must be disjoint.")


@dataclass
class FactBenchmark:
    sentences: list[Sentence]
    facts: list[Fact]
    relations: dict[str, QuestionTemplate]
    split: FactSplit | None = None
    _by_id: dict[str, Fact] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for position, sentence in enumerate(self.sentences):
            if sentence.id != position:
                raise PretraceError(f"sentence {sentence.id} is at position {position}; sentence ids must be their positions 0..N-1.")
        self._by_id = {}
        for fact in self.facts:
            if fact.fact_id in self._by_id:
                raise PretraceError(f"fact {fact.fact_id!r} appears twice; each fact once.")
            if not fact.evidence_ids:
                raise PretraceError(f"fact {fact.fact_id!r} has no evidence sentence; drop it (no ground truth to rank).")
            if fact.relation not in self.relations:
                raise PretraceError(f"fact {fact.fact_id!r}: relation {fact.relation} has no question template.")
            bad = [i for i in fact.evidence_ids if not 0 <= i < len(self.sentences)]
            if bad:
                raise PretraceError(f"fact {fact.fact_id!r}: evidence ids {bad[:3]} are outside the {len(self.sentences)} sentences.")
            self._by_id[fact.fact_id] = fact
        if self.split is not None:
            unknown = [f for f in (*self.split.finetune, *self.split.queries) if f not in self._by_id]
            if unknown:
                raise PretraceError(f"split names {len(unknown)} unknown facts (e.g. {unknown[0]!r}); rebuild the split from these facts.")

    # -- views -----------------------------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        return [sentence.text for sentence in self.sentences]

    def fact(self, fact_id: str) -> Fact:
        try:
            return self._by_id[fact_id]
        except KeyError:
            raise PretraceError(f"no fact {fact_id!r} in this benchmark.") from None

    def fact_to_ids(self) -> dict[str, list[int]]:
        return {fact.fact_id: list(fact.evidence_ids) for fact in self.facts}

    def target_sharing_ids(self) -> dict[str, list[int]]:
        """Object key -> sentences with any aligned fact of that object: hard negatives share the answer."""
        sharing: dict[str, set[int]] = defaultdict(set)
        for sentence in self.sentences:
            for key in sentence.facts:
                sharing[split_fact_key(key)[2]].add(sentence.id)
        return {obj: sorted(ids) for obj, ids in sharing.items()}

    def finetune_facts(self) -> list[Fact]:
        return [self.fact(f) for f in self._require_split().finetune]

    def query_facts(self) -> list[Fact]:
        return [self.fact(f) for f in self._require_split().queries]

    def _require_split(self) -> FactSplit:
        if self.split is None:
            raise PretraceError("this benchmark has no fine-tune/query split; make one with split_by_subject().")
        return self.split

    def stats(self) -> dict:
        evidence = [len(fact.evidence_ids) for fact in self.facts]
        stats = {
            "sentences": len(self.sentences),
            "sentences_with_facts": sum(1 for s in self.sentences if s.facts),
            "facts": len(self.facts),
            "facts_per_relation": dict(sorted(Counter(f.relation for f in self.facts).items())),
            "subjects": len({f.subject_key for f in self.facts}),
            "evidence_per_fact": _summary(evidence),
        }
        if self.split is not None:
            stats["split"] = {"finetune": len(self.split.finetune), "queries": len(self.split.queries), "seed": self.split.seed}
        return stats

    # -- files -----------------------------------------------------------------------------------

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        write_jsonl(folder / "corpus.jsonl", ({"id": s.id, "text": s.text, "facts": list(s.facts), "source": s.source} for s in self.sentences))
        write_jsonl(folder / "facts.jsonl", (fact.to_dict() for fact in self.facts))
        write_jsonl(folder / "relations.jsonl", (template.to_dict() for template in self.relations.values()))
        if self.split is not None:
            write_json(folder / "split.json", {
                "seed": self.split.seed, "query_fraction": self.split.query_fraction,
                "finetune": list(self.split.finetune), "queries": list(self.split.queries),
            })
            write_jsonl(folder / "finetune.jsonl", (_query_record(f) for f in self.finetune_facts()))
            write_jsonl(folder / "queries.jsonl", (_query_record(f) for f in self.query_facts()))
        write_json(folder / "stats.json", self.stats())


def _query_record(fact: Fact) -> dict:
    return {"id": fact.fact_id, "prompt": fact.prompt, "completion": fact.completion}


def _summary(values: Sequence[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 3), "max": max(values)}


def read_benchmark(folder: str | Path) -> FactBenchmark:
    folder = Path(folder)
    for name in ("corpus.jsonl", "facts.jsonl", "relations.jsonl"):
        if not (folder / name).is_file():
            raise PretraceError(f"{folder}: no {name}; is this a folder written by FactBenchmark.write?")
    try:
        sentences = [Sentence(int(r["id"]), r["text"], tuple(r.get("facts", ())), r.get("source", "")) for r in read_jsonl_rows(folder / "corpus.jsonl")]
        facts = [
            Fact(r["fact_id"], r["subject"], r["relation"], r["object"], r["question"], tuple(int(i) for i in r["evidence_ids"]))
            for r in read_jsonl_rows(folder / "facts.jsonl")
        ]
        relations = {r["relation"]: QuestionTemplate(**r) for r in read_jsonl_rows(folder / "relations.jsonl")}
    except (KeyError, TypeError, ValueError) as exc:
        raise PretraceError(f"{folder}: malformed benchmark files ({exc.__class__.__name__}: {exc}); delete the folder and rebuild it.") from None
    split = None
    if (folder / "split.json").is_file():
        raw = read_json(folder / "split.json")
        split = FactSplit(tuple(raw["finetune"]), tuple(raw["queries"]), int(raw["seed"]), float(raw["query_fraction"]))
    return FactBenchmark(sentences, facts, relations, split)


def attach_evidence(sentences: Iterable[Sentence], candidates: Iterable[tuple[str, str, str, str]], relations: dict[str, QuestionTemplate]) -> tuple[list[Fact], int]:
    """Facts with their evidence sentences, from candidate facts (key, subject name, relation, object name).

    A fact's evidence is every sentence whose aligned facts contain its key. Facts stated by no sentence
    are dropped (there is nothing to rank); their number is returned with the kept facts.
    """
    ids_by_key: dict[str, list[int]] = defaultdict(list)
    for sentence in sentences:
        for key in sentence.facts:
            ids_by_key[key].append(sentence.id)
    facts, dropped, seen = [], 0, set()
    for key, subject, relation, obj in candidates:
        if key in seen:
            continue
        seen.add(key)
        if relation not in relations:
            raise PretraceError(f"fact {key!r}: relation {relation} has no question template; add one for it to the templates file.")
        ids = ids_by_key.get(key)
        if not ids:
            dropped += 1
            continue
        facts.append(Fact(key, subject, relation, obj, relations[relation].ask(subject), tuple(sorted(set(ids)))))
    return facts, dropped
