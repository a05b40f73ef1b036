"""The paper's benchmark from the real files: T-REx (attribution set) and LAMA's T-REx facts (queries).

T-REx (https://hadyelsahar.github.io/t-rex/) ships JSON files (`re-nlg_<start>-<end>.json`), each a list
of documents with `docid`, `uri`, `title`, `text`, `sentences_boundaries` ([start, end] character
offsets) and `triples`; each triple names its `sentence_id` and a `subject`, `predicate` and `object`
(`uri`, `surfaceform`, `boundaries`, `annotator`). LAMA (https://dl.fbaipublicfiles.com/LAMA/data.zip)
ships `TREx/P*.jsonl`, one fact a line (`predicate_id`, `sub_uri`, `sub_label`, `obj_uri`,
`obj_label`, `uuid`, `evidences`), and `relations.jsonl` (`relation`, `template` with [X]/[Y], `label`,
`description`, `type`). Queries are asked with per-relation questions (the paper's bloom_questions.jsonl).

As in the paper, the attribution set holds one record per T-REx sentence that has at least one aligned
Wikidata triple that is a LAMA fact; a record's facts are all its entity-to-entity triples (literal
objects such as dates are skipped), and a LAMA fact's ground truth is every sentence aligned to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrace.bench.facts.benchmark import FactBenchmark, Sentence, attach_evidence, fact_key
from pretrace.bench.facts.templates import OBJECT_SLOT, SUBJECT_SLOT, QuestionTemplate, read_question_templates
from pretrace.data.records import iter_json_objects
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar

ENTITY_PREFIX = "http://www.wikidata.org/entity/"
PREDICATE_PREFIX = "http://www.wikidata.org/prop/direct/"
_FILE_START = re.compile(r"(\d+)")


@dataclass(frozen=True)
class LamaFact:
    relation: str
    subject_id: str
    subject_label: str
    object_id: str
    object_label: str
    uuid: str = ""

    @property
    def key(self) -> str:
        return fact_key(self.relation, self.subject_id, self.object_id)


@dataclass(frozen=True)
class LamaRelation:
    relation: str
    template: str  # cloze with [X] (subject) and [Y] (object)
    label: str = ""
    description: str = ""
    type: str = ""


def _strip_prefix(uri: str, prefix: str) -> str | None:
    return uri[len(prefix):] if isinstance(uri, str) and uri.startswith(prefix) and len(uri) > len(prefix) else None


def triple_key(triple: dict) -> str | None:
    """The "P,Q,Q" key of a T-REx triple, or None unless subject and object are Wikidata entities."""
    try:
        relation = _strip_prefix(triple["predicate"]["uri"], PREDICATE_PREFIX)
        subject = _strip_prefix(triple["subject"]["uri"], ENTITY_PREFIX)
        obj = _strip_prefix(triple["object"]["uri"], ENTITY_PREFIX)
    except (KeyError, TypeError):
        return None
    if relation is None or subject is None or obj is None:
        return None
    return fact_key(relation, subject, obj)


def trex_files(path: str | Path) -> list[Path]:
    """One T-REx JSON file, or every *.json in a folder ordered by its start index (re-nlg_0-10000 first)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PretraceError(f"{path}: no such file or folder; pass a T-REx JSON file or the folder of the extracted T-REx ZIP.")
    files = list(path.glob("*.json"))
    if not files:
        raise PretraceError(f"{path}: no *.json files; extract the T-REx JSON ZIP into this folder.")

    def order(file: Path):
        match = _FILE_START.search(file.stem)
        return (int(match.group(1)) if match else -1, file.name)

    return sorted(files, key=order)


def iter_trex_documents(path: str | Path) -> Iterator[tuple[Path, int, dict]]:
    """(file, index in file, document) for every T-REx document, checked for the fields we use."""
    for file in trex_files(path):
        try:
            documents = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PretraceError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}); is the download complete?") from None
        if not isinstance(documents, list):
            raise PretraceError(f"{file}: expected a JSON list of T-REx documents, got {type(documents).__name__}.")
        for index, document in enumerate(documents):
            missing = [k for k in ("text", "sentences_boundaries", "triples") if not isinstance(document, dict) or k not in document]
            if missing:
                raise PretraceError(f"{file}: document {index} lacks {missing}; is this a T-REx JSON file?")
            yield file, index, document


def trex_sentences(documents: Iterable[tuple[Path, int, dict]], required_facts: set[str] | None = None) -> tuple[list[Sentence], int]:
    """The sentence-level attribution set: sentences with an entity triple (and, if given, a required fact), and how
    many sentences with an entity triple were left out for lacking a required fact."""
    sentences: list[Sentence] = []
    left_out = 0
    for file, index, document in documents:
        text, bounds = document["text"], document["sentences_boundaries"]
        facts_by_sentence: dict[int, list[str]] = {}
        for triple in document["triples"]:
            sentence_id = triple.get("sentence_id")
            if not isinstance(sentence_id, int) or not 0 <= sentence_id < len(bounds):
                raise PretraceError(f"{file}: document {index} has a triple in sentence {sentence_id!r} but {len(bounds)} sentence boundaries.")
            key = triple_key(triple)
            if key is None:
                continue
            keys = facts_by_sentence.setdefault(sentence_id, [])
            if key not in keys:
                keys.append(key)
        for sentence_id in sorted(facts_by_sentence):
            keys = facts_by_sentence[sentence_id]
            if required_facts is not None and not any(k in required_facts for k in keys):
                left_out += 1
                continue
            start, end = bounds[sentence_id]
            sentences.append(Sentence(len(sentences), text[start:end], tuple(keys), f"{document.get('docid', document.get('uri', ''))}#{sentence_id}"))
    return sentences, left_out


def lama_files(folder: str | Path) -> list[Path]:
    """LAMA's T-REx relation files (`<folder>/P*.jsonl`) in name order."""
    folder = Path(folder)
    files = sorted(folder.glob("P*.jsonl")) if folder.is_dir() else []
    if not files:
        raise PretraceError(f"{folder}: no P*.jsonl files; pass the TREx folder of the extracted LAMA data.zip.")
    return files


def read_lama_facts(folder: str | Path) -> list[LamaFact]:
    """Every fact of LAMA's T-REx part (`<folder>/P*.jsonl`, files in name order, lines in file order)."""
    facts = []
    for file in lama_files(folder):
        for number, row in iter_json_objects(file):
            try:
                facts.append(LamaFact(row["predicate_id"], row["sub_uri"], row["sub_label"], row["obj_uri"], row["obj_label"], row.get("uuid", "")))
            except KeyError as exc:
                raise PretraceError(f"{file}:{number}: missing field {exc}; LAMA T-REx lines have predicate_id, sub_uri, sub_label, obj_uri, obj_label.") from None
    return facts


def read_lama_evidences(folder: str | Path) -> dict[str, list[str] | None]:
    """Fact key -> the `masked_sentence`s of its LAMA `evidences`, in file order (None: a line without them)."""
    evidences: dict[str, list[str] | None] = {}
    for file in lama_files(folder):
        for number, row in iter_json_objects(file):
            try:
                key = fact_key(row["predicate_id"], row["sub_uri"], row["obj_uri"])
            except KeyError as exc:
                raise PretraceError(f"{file}:{number}: missing field {exc}; LAMA T-REx lines have predicate_id, sub_uri, obj_uri.") from None
            raw = row.get("evidences")
            sentences = [e["masked_sentence"] for e in raw if isinstance(e, dict) and isinstance(e.get("masked_sentence"), str)] if isinstance(raw, list) else []
            if raw is None or (raw and not sentences):
                evidences.setdefault(key, None)
            else:
                evidences[key] = [*(evidences.get(key) or []), *sentences]
    return evidences


def lama_relations_path(lama_trex_folder: str | Path) -> Path:
    """Where LAMA's data.zip puts relations.jsonl: beside its TREx folder."""
    return Path(lama_trex_folder).parent / "relations.jsonl"


def read_lama_relations(path: str | Path) -> dict[str, LamaRelation]:
    """LAMA's relations.jsonl: relation id -> cloze template ([X] subject, [Y] object) and metadata."""
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such file; pass LAMA's relations.jsonl.")
    relations = {}
    for number, row in iter_json_objects(path):
        try:
            relation = LamaRelation(row["relation"], row["template"], row.get("label", ""), row.get("description", ""), row.get("type", ""))
        except KeyError as exc:
            raise PretraceError(f"{path}:{number}: missing field {exc}; LAMA relations have 'relation' and 'template'.") from None
        if SUBJECT_SLOT not in relation.template or OBJECT_SLOT not in relation.template:
            raise PretraceError(f"{path}:{number}: template {relation.template!r} needs both {SUBJECT_SLOT} and {OBJECT_SLOT}.")
        relations[relation.relation] = relation
    return relations


def build_trex_lama_benchmark(trex_path: str | Path, lama_trex_folder: str | Path, questions_path: str | Path) -> tuple[FactBenchmark, dict]:
    """The paper's attribution set and queries; returns the benchmark and build counts (facts dropped, ...)."""
    templates: dict[str, QuestionTemplate] = read_question_templates(questions_path)
    lama = read_lama_facts(lama_trex_folder)
    required = {fact.key for fact in lama}
    documents = progress_bar(iter_trex_documents(trex_path), desc="T-REx documents", unit="doc", leave=False)
    sentences, without_lama_fact = trex_sentences(documents, required)
    facts, dropped = attach_evidence(sentences, ((f.key, f.subject_label, f.relation, f.object_label) for f in lama), templates)
    used = {fact.relation for fact in facts}
    benchmark = FactBenchmark(sentences, facts, {r: t for r, t in templates.items() if r in used})
    return benchmark, {"lama_facts": len(required), "facts_without_evidence": dropped, "facts": len(facts), "sentences": len(sentences),
                       "sentences_without_lama_fact": without_lama_fact}


def shipped_questions() -> Path:
    """The paper's question templates for LAMA's 41 T-REx relations (bloom_questions.jsonl), shipped with pretrace."""
    return Path(__file__).with_name("bloom_questions.jsonl")
