"""LAMA probing in the paper's three prompt styles (Exp 2 step 9): does a model know the queried facts' answers, and
did the fine-tune teach them?

- question: the benchmark's own prompt, "Question: <the relation's question about X>\\nAnswer:"
  (bloom_questions.jsonl; the probe the benchmark always ran);
- evidence: a corpus sentence that states the fact, cut before the object: LAMA's `masked_sentence` cut before
  [MASK] for T-REx/LAMA (its first evidence with text before [MASK]); otherwise the fact's first evidence
  sentence that names the object after some text, cut before that name;
- cloze: the relation's LAMA template cut at [Y] ("The capital of [X] is [Y] ." -> "The capital of France is").

The completion is always " " + the object. Each style is scored two ways: the seed's protocol (only objects that
are one token; the answer's rank is that token's) and pretrace's worst-rank rule over every object
(`probe.answer_ranks`; for a one-token object both are the same rank). Top-k accuracy is a mean over the probed
facts with a bootstrap interval. A fact a style cannot ask (no usable evidence sentence, a prompt too long for
--max-length) is left out of that style and counted; a style whose input is missing is refused before any work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pretrace.bench.facts.benchmark import Fact, Sentence
from pretrace.bench.facts.stats import mean_interval, paired_difference
from pretrace.bench.facts.templates import check_cloze_template, cloze_prompt
from pretrace.data.records import Query
from pretrace.errors import PretraceError

PROBE_KS = (1, 3, 5, 10)
PROTOCOLS = {"all_objects": "all objects (worst token rank)", "single_token": "one-token objects (the seed's protocol)"}
MASK = "[MASK]"


@dataclass
class StyleQueries:
    """One style's probe: its queries (facts it can ask, in fact order), how it asks, and the facts it left out."""

    style: str
    description: str
    queries: list[Query]
    left_out: dict[str, int] = field(default_factory=dict)


def masked_prefix(masked_sentence: str) -> str | None:
    """LAMA's masked sentence cut before [MASK]; None when nothing precedes it (a left-to-right model gets no context)."""
    if MASK not in masked_sentence:
        return None
    return masked_sentence.split(MASK, 1)[0].rstrip() or None


def named_prefix(text: str, names: Iterable[str]) -> str | None:
    """`text` cut before its first whole-word, exact-case occurrence of any of `names` that has text before it."""
    alternatives = sorted({n for n in names if n}, key=len, reverse=True)  # longest first: "Papua New Guinea", not "Guinea"
    if not alternatives:
        return None
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, alternatives)) + r")(?!\w)")
    for match in pattern.finditer(text):
        prefix = text[:match.start()].rstrip()
        if prefix:
            return prefix
    return None


def lama_evidence_prompts(facts: Sequence[Fact], evidences: Mapping[str, list[str] | None]) -> dict[str, str | None]:
    """Fact id -> its first LAMA evidence cut before [MASK] (None: no usable one); refuses facts whose LAMA line has no
    `evidences` field."""
    missing = [f.fact_id for f in facts if evidences.get(f.fact_id) is None]
    if missing:
        raise PretraceError(f"{len(missing)} queried facts (e.g. {missing[0]!r}) have no 'evidences' field (with 'masked_sentence') in the LAMA files; "
                            "the evidence prompt style needs LAMA's T-REx files as data.zip ships them, or leave 'evidence' out of --probe-styles.")
    return {f.fact_id: next((p for p in map(masked_prefix, evidences[f.fact_id]) if p), None) for f in facts}


def sentence_evidence_prompts(facts: Sequence[Fact], sentences: Sequence[Sentence], names: Mapping[str, Iterable[str]]) -> dict[str, str | None]:
    """Fact id -> its first evidence sentence (by id) cut before the object's first name with text before it (`names`:
    object key -> the names it goes by; the object itself always counts); None: no evidence sentence allows it."""
    prompts = {}
    for fact in facts:
        aliases = {fact.object, *names.get(fact.object_key, ())}
        prompts[fact.fact_id] = next((p for p in (named_prefix(sentences[i].text, aliases) for i in fact.evidence_ids) if p), None)
    return prompts


def cloze_prompts(facts: Sequence[Fact], templates: Mapping[str, str], where: str) -> dict[str, str]:
    """Fact id -> its relation's cloze template cut at [Y]; refuses relations without a usable template."""
    missing = sorted({f.relation for f in facts} - set(templates))
    if missing:
        raise PretraceError(f"relations {', '.join(missing)} of the queried facts have no cloze template in {where}; add them (LAMA's relations.jsonl "
                            "form: 'relation', 'template' with [X] and then [Y]) and pass the file with --cloze-templates, or leave 'cloze' out of --probe-styles.")
    for relation in sorted({f.relation for f in facts}):
        check_cloze_template(relation, templates[relation])
    return {f.fact_id: cloze_prompt(templates[f.relation], f.subject) for f in facts}


def style_queries(style: str, description: str, facts: Sequence[Fact], prompts: Mapping[str, str | None], tokenizer, max_length: int) -> StyleQueries:
    """The facts a style can ask, as queries (completion " " + object); the rest counted by reason."""
    queries, left_out = [], {}
    for fact in facts:
        prompt = prompts[fact.fact_id]
        if prompt is None:
            reason = "no evidence sentence with text before the object"
        elif _tokens(tokenizer, prompt, True) + _tokens(tokenizer, fact.completion, False) > max_length:
            reason = "prompt and answer longer than --max-length"
        else:
            queries.append(Query(fact.fact_id, prompt, fact.completion))
            continue
        left_out[reason] = left_out.get(reason, 0) + 1
    return StyleQueries(style, description, queries, left_out)


def _tokens(tokenizer, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def one_token_answers(tokenizer, facts: Sequence[Fact]) -> set[str]:
    """Ids of the facts whose completion (" " + object) is one token: the seed's probe keeps only those."""
    return {f.fact_id for f in facts if _tokens(tokenizer, f.completion, False) == 1}


def accuracy(ranks: Mapping[str, int], ids: Sequence[str], resamples: int, seed: int) -> dict:
    """Top-k accuracy over `ids` for each k, with bootstrap intervals (None when there is no fact)."""
    return {"n": len(ids), **{f"top{k}": mean_interval([float(ranks[i] <= k) for i in ids], resamples, seed) if ids else None for k in PROBE_KS}}


def probe_results(styles: Mapping[str, StyleQueries], ranks: Mapping[str, Mapping[str, Mapping[str, int]]], one_token: set[str], facts_label: str,
                  queried: int, resamples: int, seed: int) -> dict:
    """Per style how it asked and what it left out; per model (by name: "pretrained", "finetuned@<α>") and style the
    accuracy under both protocols; per fine-tuned model the paired difference with the pre-trained one."""
    ids = {style: [q.id for q in sq.queries] for style, sq in styles.items()}
    protocol_ids = {style: {"all_objects": i, "single_token": [f for f in i if f in one_token]} for style, i in ids.items()}
    results = {
        "facts": facts_label, "queried": queried, "ks": list(PROBE_KS), "protocols": PROTOCOLS,
        "styles": {style: {"prompt": sq.description, "example": {"prompt": sq.queries[0].prompt, "completion": sq.queries[0].completion} if sq.queries else None,
                           "probed": len(sq.queries), "single_token": len(protocol_ids[style]["single_token"]), "left_out": sq.left_out}
                   for style, sq in styles.items()},
        "models": {model: {style: {p: accuracy(by_style[style], chosen, resamples, seed) for p, chosen in protocol_ids[style].items()} for style in styles}
                   for model, by_style in ranks.items()},
    }
    results["finetuned_minus_pretrained"] = {
        model: {style: {p: {f"top{k}": _difference(by_style[style], ranks["pretrained"][style], chosen, k, resamples, seed) for k in PROBE_KS}
                        for p, chosen in protocol_ids[style].items()} for style in styles}
        for model, by_style in ranks.items() if model != "pretrained"}
    return results


def _difference(finetuned: Mapping[str, int], pretrained: Mapping[str, int], ids: Sequence[str], k: int, resamples: int, seed: int) -> dict | None:
    if not ids:
        return None
    return paired_difference([float(finetuned[i] <= k) for i in ids], [float(pretrained[i] <= k) for i in ids], resamples, seed)


# -- results.md -----------------------------------------------------------------------------------


def _interval(summary: dict | None) -> str:
    return "—" if summary is None else f"{summary['mean']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def _signed(summary: dict | None) -> str:
    return "—" if summary is None else f"{summary['mean']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"


def probe_table(results: dict, models: Sequence[str]) -> list[str]:
    """Top-k accuracy of `models` in every style under both protocols, and each fine-tuned model's top-1 gain."""
    lines = [f"LAMA probing of the {results['facts']}: top-k answer accuracy (95% bootstrap intervals over the facts probed).", "",
             "| model | prompt style | objects | facts | " + " | ".join(f"top-{k}" for k in results["ks"]) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(results["ks"])]
    for model in models:
        for style, by_protocol in results["models"][model].items():
            for protocol, row in by_protocol.items():
                lines.append(f"| {model} | {style} | {PROTOCOLS[protocol]} | {row['n']} | " + " | ".join(_interval(row[f"top{k}"]) for k in results["ks"]) + " |")
    for model in models:
        if model in results["finetuned_minus_pretrained"]:
            gains = results["finetuned_minus_pretrained"][model]
            lines += ["", f"{model} − pretrained, top-1 (paired over the same facts; all objects / one-token objects): "
                      + "; ".join(f"{style} {_signed(g['all_objects']['top1'])} / {_signed(g['single_token']['top1'])}" for style, g in gains.items()) + "."]
    return [*lines, ""]


def probe_notes(results: dict) -> list[str]:
    """How each style asked, with an example, and which facts it left out."""
    lines = ["### LAMA probing: the prompt styles", "",
             f"{results['queried']} {results['facts']}; the completion is \" \" + the object. One-token objects are scored as in the paper's seed "
             "(only facts whose object is one token); all objects with the worst rank of any object token under teacher forcing.", ""]
    for style, entry in results["styles"].items():
        left = "; ".join(f"{n} left out: {reason}" for reason, n in entry["left_out"].items())
        example = f"; e.g. {entry['example']['prompt']!r} → {entry['example']['completion']!r}" if entry["example"] else ""
        lines.append(f"- **{style}**: {entry['prompt']}{example}. {entry['probed']} facts probed ({entry['single_token']} with a one-token object){'; ' + left if left else ''}.")
    return [*lines, ""]
