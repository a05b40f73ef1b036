"""Per-relation question templates (the paper's `bloom_questions.jsonl` format) and the prompt they make.

A fact (subject, relation, object) is asked as the relation's question with `[X]` replaced by the
subject; the answer (the completion whose loss is attributed) is the object. LAMA's cloze templates
("[X] is the capital of [Y] .") probe the same fact without a question: a left-to-right model can only
fill the object in at the end, so the prompt is the template cut at `[Y]` (`cloze_prompt`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrace.errors import PretraceError

SUBJECT_SLOT = "[X]"
OBJECT_SLOT = "[Y]"


@dataclass(frozen=True)
class QuestionTemplate:
    relation: str
    question: str
    label: str = ""
    description: str = ""
    type: str = ""

    def __post_init__(self) -> None:
        if self.question.count(SUBJECT_SLOT) != 1:
            raise PretraceError(f"relation {self.relation}: question {self.question!r} must contain {SUBJECT_SLOT} exactly once (the subject's place).")

    def ask(self, subject: str) -> str:
        return self.question.replace(SUBJECT_SLOT, subject)

    def to_dict(self) -> dict:
        return asdict(self)


def format_prompt(question: str) -> str:
    """The query prompt; its completion is " " + the object, so the answer's first token carries its space."""
    return f"Question: {question}\nAnswer:"


def check_cloze_template(relation: str, template: str) -> None:
    """Refuse a cloze template a left-to-right model cannot complete: [X] once, then [Y] once after it."""
    if template.count(SUBJECT_SLOT) != 1 or template.count(OBJECT_SLOT) != 1 or template.index(SUBJECT_SLOT) > template.index(OBJECT_SLOT):
        raise PretraceError(f"relation {relation}: cloze template {template!r} must hold {SUBJECT_SLOT} once and then {OBJECT_SLOT} once after it "
                            f"(the prompt is the template cut at {OBJECT_SLOT}); reword it, e.g. '[X] is the capital of [Y] .'.")


def cloze_prompt(template: str, subject: str) -> str:
    """The template cut at [Y], subject filled in: the object is what comes next. (Replacing [Y] by nothing would
    leave the trailing " ." in the prompt, and the model would be asked what follows the full stop.)"""
    return template[:template.index(OBJECT_SLOT)].replace(SUBJECT_SLOT, subject).rstrip()


def read_question_templates(path: str | Path) -> dict[str, QuestionTemplate]:
    """Relation id -> template from a JSONL file with fields relation, question (with [X]), label, description, type."""
    path = Path(path)
    if not path.is_file():
        raise PretraceError(f"{path}: no such file; pass the question templates (JSONL with 'relation' and 'question' holding [X]).")
    templates: dict[str, QuestionTemplate] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            relation, question = row["relation"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PretraceError(f"{path}:{number}: expected a JSON object with 'relation' and 'question' ({exc.__class__.__name__}: {exc}).") from None
        if relation in templates:
            raise PretraceError(f"{path}:{number}: relation {relation} appears twice; keep one question per relation.")
        templates[relation] = QuestionTemplate(
            relation, question, row.get("label", ""), row.get("description", ""), row.get("type", "")
        )
    if not templates:
        raise PretraceError(f"{path}: no question templates; the file is empty.")
    return templates
