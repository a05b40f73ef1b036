"""LAMA probing in three prompt styles (question, evidence, cloze): prompts, ranks and accuracies checked by hand,
the seed's period bug shown on a model whose ranks can be counted, refusals of missing inputs, and the stages of a
T-REx/LAMA run (probing and coverage) reused by a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrace.bench.facts.benchmark import Fact, Sentence
from pretrace.bench.facts.bundled_facts import CLOZE_TEMPLATES, RELATIONS
from pretrace.bench.facts.lama_probe import (StyleQueries, cloze_prompts, lama_evidence_prompts, masked_prefix, named_prefix, one_token_answers,
                                             probe_results, sentence_evidence_prompts, style_queries)
from pretrace.bench.facts.probe import answer_ranks
from pretrace.bench.facts.run import FactTracingSettings, run_fact_tracing
from pretrace.bench.settings.fact_tracing import parse_styles
from pretrace.bench.facts.templates import cloze_prompt
from pretrace.bench.facts.trex_lama import read_lama_evidences
from pretrace.config import from_flags
from pretrace.data.records import Query
from pretrace.errors import PretraceError
from tiny import WORDS, assert_refused, save_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
TREX, LAMA = FIXTURES / "trex", FIXTURES / "lama"
TINY = dict(candidates=3, random_candidates=4, sharing_candidates=2, top=10, lr=1e-3, epochs=1, fit_sentences=6, preset="all", last_layers=1,
            batch_size=4, max_length=32, device="cpu", query_rank=0, chunk=5, bootstrap=500)


def _fact(relation: str, subject: str, obj: str, evidence: tuple[int, ...] = (0,)) -> Fact:
    return Fact(f"{relation},{subject},{obj}", subject, relation, obj, f"question about {subject}", evidence)


# -- prompts ------------------------------------------------------------------------------------------


def test_cloze_prompts_cut_the_template_at_the_object():
    assert cloze_prompt("[X] is the capital of [Y] .", "Warsaw") == "Warsaw is the capital of"
    assert cloze_prompt("The capital of [X] is [Y] .", "France") == "The capital of France is"
    facts = [_fact("P36", "the United States", "Washington"), _fact("P47", "France", "Spain")]
    assert cloze_prompts(facts, CLOZE_TEMPLATES, "bundled") == {facts[0].fact_id: "The capital of the United States is",
                                                                 facts[1].fact_id: "France shares border with"}
    with pytest.raises(PretraceError, match=r"relations P47 of the queried facts have no cloze template in mine.jsonl.*--probe-styles"):
        cloze_prompts(facts, {"P36": "The capital of [X] is [Y] ."}, "mine.jsonl")
    with pytest.raises(PretraceError, match=r"\[X\] once and then \[Y\] once after it"):
        cloze_prompts(facts[:1], {"P36": "[Y] is the capital of [X] ."}, "mine.jsonl")  # a left-to-right model never sees X


def test_bundled_cloze_templates_cover_every_relation_in_lamas_wording():
    assert set(CLOZE_TEMPLATES) == set(RELATIONS)
    lama = {"P36": "The capital of [X] is [Y] .", "P37": "The official language of [X] is [Y] .", "P30": "[X] is located in [Y] .",
            "P361": "[X] is part of [Y] .", "P47": "[X] shares border with [Y] .", "P131": "[X] is located in [Y] ."}  # LAMA's relations.jsonl
    assert {r: CLOZE_TEMPLATES[r] for r in lama} == lama
    assert all(t.endswith("[Y] .") for t in CLOZE_TEMPLATES.values())


def test_evidence_prompts_are_cut_before_the_object():
    assert masked_prefix("Marie Curie was born in [MASK] in 1867.") == "Marie Curie was born in"
    assert masked_prefix("[MASK] is the capital of Poland.") is None and masked_prefix("no mask here") is None
    facts = [_fact("P19", "Q7186", "Warsaw"), _fact("P36", "Q36", "Warsaw")]
    evidences = {facts[0].fact_id: ["[MASK] is the birthplace of Marie Curie.", "Marie Curie was born in [MASK] in 1867."],
                 facts[1].fact_id: ["[MASK] is the capital of Poland."]}
    assert lama_evidence_prompts(facts, evidences) == {facts[0].fact_id: "Marie Curie was born in", facts[1].fact_id: None}
    with pytest.raises(PretraceError, match="no 'evidences' field.*leave 'evidence' out of --probe-styles"):
        lama_evidence_prompts(facts, {facts[0].fact_id: None, facts[1].fact_id: []})
    # sentences: whole words, exact case, the first occurrence with text before it, any of the object's names
    assert named_prefix("Paris is the capital of France, and Paris its largest city.", ["Paris"]) == "Paris is the capital of France, and"
    assert named_prefix("Its currency is the euro (euros).", ["Euro", "euros"]) == "Its currency is the euro ("
    assert named_prefix("Port Moresby is in Papua New Guinea.", ["Guinea", "Papua New Guinea"]) == "Port Moresby is in"
    assert named_prefix("Kievan Rus", ["Kiev"]) is None
    sentences = [Sentence(0, "Kyiv is the capital of Ukraine.", ()), Sentence(1, "Ukraine's capital, Kiev, lies on the Dnieper.", ())]
    kyiv = _fact("P36", "Ukraine", "Kyiv", (0, 1))
    assert sentence_evidence_prompts([kyiv], sentences, {"Kyiv": {"Kiev"}}) == {kyiv.fact_id: "Ukraine's capital,"}


def lama_with_a_leading_mask(folder: Path) -> Path:
    """A copy of the LAMA fixture whose Curie/Warsaw fact first has an evidence that starts with [MASK] (nothing to cut)."""
    shutil.copytree(LAMA, folder)
    path = folder / "TREx" / "P19.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["evidences"].insert(0, {"sub_surface": "Marie Curie", "obj_surface": "Warsaw", "masked_sentence": "[MASK] is the birthplace of Marie Curie."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lama_fixture_evidences_are_read_in_file_order(tmp_path):
    evidences = read_lama_evidences(lama_with_a_leading_mask(tmp_path / "lama") / "TREx")
    assert evidences["P19,Q7186,Q270"] == ["[MASK] is the birthplace of Marie Curie.", "Marie Curie was born in [MASK] in 1867."]
    folder = tmp_path / "TREx"
    folder.mkdir()
    rows = [json.loads(line) for line in (LAMA / "TREx" / "P36.jsonl").read_text().splitlines()]
    del rows[0]["evidences"]
    (folder / "P36.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_lama_evidences(folder) == {"P36,Q142,Q90": None, "P36,Q36,Q270": ["[MASK] is the capital of Poland."]}


def test_styles_leave_out_what_they_cannot_ask_and_the_flag_is_checked(tokenizer):
    facts = [_fact("P36", "france", "paris"), _fact("P36", "italy", "rome")]
    prompts = {facts[0].fact_id: "paris is the capital of " * 10, facts[1].fact_id: None}  # 50 tokens > 32
    made = style_queries("evidence", "how", facts, prompts, tokenizer, max_length=32)
    assert made.queries == [] and made.left_out == {"prompt and answer longer than --max-length": 1, "no evidence sentence with text before the object": 1}
    assert parse_styles("cloze, evidence") == ("cloze", "evidence") and parse_styles("none") == ()
    for bad in ("question", "evidence,typo", ""):
        with pytest.raises(PretraceError, match="--probe-styles"):
            parse_styles(bad)
    with pytest.raises(PretraceError, match="--cloze-templates has no effect"):
        from_flags(FactTracingSettings, probe_styles="evidence", cloze_templates="x.jsonl")


# -- ranks and accuracies, counted by hand ---------------------------------------------------------------


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits are bigram counts of tiny.WORDS: every rank can be counted by hand."""

    def __init__(self, tokenizer):
        super().__init__()
        ids = tokenizer(" ".join(WORDS))["input_ids"]
        counts = torch.zeros(len(tokenizer), len(tokenizer))
        for a, b in zip(ids, ids[1:]):
            counts[a, b] += 1
        self.counts = torch.nn.Parameter(counts, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.counts[input_ids])


def test_the_seeds_period_bug_changes_the_answer_and_both_protocols_count_by_hand(tokenizer):
    """In tiny.WORDS, "of" is followed by france and germany once each, "." by a, paris, berlin, the, rome and birds,
    "in" by the, italy and spain, and "the" by capital twice and by cat, mat, park, sun and moon once. Rank = 1 +
    the number of tokens with a strictly larger count."""
    model = Bigram(tokenizer)
    templates = {"P1376": "[X] is the capital of [Y] .", "P276": "[X] ran in [Y] ."}
    facts = [_fact("P1376", "paris", "france"), _fact("P1376", "berlin", "germany"), _fact("P276", "a dog", "the park")]
    cut = cloze_prompts(facts, templates, "test")
    assert list(cut.values()) == ["paris is the capital of", "berlin is the capital of", "a dog ran in"]
    buggy = {f.fact_id: templates[f.relation].replace("[X]", f.subject).replace("[Y]", "") for f in facts}  # the seed: "... of  ."
    assert buggy[facts[0].fact_id] == "paris is the capital of  ."

    def ranks(prompts):
        return answer_ranks(model, tokenizer, [Query(f.fact_id, prompts[f.fact_id], f.completion) for f in facts], batch_size=2, progress=False)

    cut_ranks, buggy_ranks = ranks(cut), ranks(buggy)
    # france after "of": nothing counts more (germany ties) -> 1; after ".": six tokens count 1, france 0 -> 7.
    # "the park": "the" after "in" -> 1 (ties), then "park" after "the" -> 2 (capital counts 2): worst rank 2, either way.
    assert [cut_ranks[f.fact_id] for f in facts] == [1, 1, 2]
    assert [buggy_ranks[f.fact_id] for f in facts] == [7, 7, 2]
    one_token = one_token_answers(tokenizer, facts)
    assert one_token == {facts[0].fact_id, facts[1].fact_id}  # " the park" is two tokens: the seed would drop it
    styles = {"question": StyleQueries("question", "cut", [Query(f.fact_id, cut[f.fact_id], f.completion) for f in facts]),
              "cloze": StyleQueries("cloze", "buggy", [Query(f.fact_id, buggy[f.fact_id], f.completion) for f in facts])}
    results = probe_results(styles, {"pretrained": {"question": cut_ranks, "cloze": buggy_ranks},
                                     "finetuned@1": {"question": cut_ranks, "cloze": cut_ranks}}, one_token, "test facts", 3, 200, 0)
    by_hand = {  # (style, protocol) -> top-1, top-3, top-5, top-10 over the facts kept
        ("question", "all_objects"): (2 / 3, 1, 1, 1), ("question", "single_token"): (1, 1, 1, 1),
        ("cloze", "all_objects"): (0, 1 / 3, 1 / 3, 1), ("cloze", "single_token"): (0, 0, 0, 1),
    }
    for (style, protocol), expected in by_hand.items():
        row = results["models"]["pretrained"][style][protocol]
        assert row["n"] == (3 if protocol == "all_objects" else 2)
        assert [row[f"top{k}"]["mean"] for k in (1, 3, 5, 10)] == pytest.approx(list(expected)), (style, protocol)
    gain = results["finetuned_minus_pretrained"]["finetuned@1"]["cloze"]
    assert gain["all_objects"]["top1"]["mean"] == pytest.approx(2 / 3) and gain["single_token"]["top1"]["mean"] == pytest.approx(1.0)
    assert (gain["all_objects"]["top1"]["wins"], gain["all_objects"]["top1"]["ties"]) == (2, 1)


# -- T-REx/LAMA end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trex_run(tmp_path_factory):
    """The fixture's benchmark, 1 fine-tuning fact, the 3 left-out fine-tuning-split facts probed (--query-set dev)."""
    root = tmp_path_factory.mktemp("lama-probe")
    model = save_tiny_model(root / "model", "llama", dtype=torch.float32)
    lama = lama_with_a_leading_mask(root / "lama")
    settings = from_flags(FactTracingSettings, out=str(root / "out"), data="trex-lama", trex=str(TREX), lama=str(lama / "TREx"), model=str(model),
                          query_set="dev", finetune_facts=1, alphas="0.1", **TINY)
    first = run_fact_tracing(settings)
    return root, settings, first, run_fact_tracing(settings)


PROMPTS = {  # by hand, from the fixture's LAMA lines (with the leading-mask evidence), relations.jsonl and the shipped bloom_questions.jsonl
    "question": {"P1376,Q270,Q36": "Question: What is Warsaw the capital of?\nAnswer:", "P19,Q7186,Q270": "Question: Where was Marie Curie born?\nAnswer:",
                 "P36,Q142,Q90": "Question: Where is the capital of France?\nAnswer:"},
    "evidence": {"P1376,Q270,Q36": "Warsaw is the capital of", "P19,Q7186,Q270": "Marie Curie was born in",  # its first evidence starts with [MASK]
                 "P36,Q142,Q90": "Paris is the capital and most populous city of"},
    "cloze": {"P1376,Q270,Q36": "Warsaw is the capital of", "P19,Q7186,Q270": "Marie Curie was born in", "P36,Q142,Q90": "The capital of France is"},
}
ANSWERS = {"P1376,Q270,Q36": " Poland", "P19,Q7186,Q270": " Warsaw", "P36,Q142,Q90": " Paris"}


def _worst_rank(model, tokenizer, prompt: str, completion: str) -> int:
    prompt_ids, completion_ids = tokenizer(prompt)["input_ids"], tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return max(int((logits[p] > logits[p, ids[p + 1]]).sum()) + 1 for p in range(len(prompt_ids) - 1, len(ids) - 1))


def test_trex_lama_probe_ranks_and_accuracies_match_a_hand_computation(trex_run):
    from pretrace.modeling.loading import load_model, load_tokenizer

    root, settings, results, _ = trex_run
    probe = results["lama_probe"]
    assert probe["facts"].startswith("dev facts") and probe["queried"] == 3 and results["query_ids"] == list(ANSWERS)
    assert probe["styles"]["evidence"]["probed"] == 3 and probe["styles"]["evidence"]["left_out"] == {}
    assert probe["styles"]["cloze"]["example"] == {"prompt": PROMPTS["cloze"]["P1376,Q270,Q36"], "completion": " Poland"}
    tokenizer = load_tokenizer(root / "model")
    models = {"pretrained": root / "model", "finetuned@0.1": root / "out" / "alpha-0.1" / "finetuned"}
    for name, folder in models.items():
        model = load_model(folder, "float32")
        for style, prompts in PROMPTS.items():
            ranks = {f: _worst_rank(model, tokenizer, prompt, ANSWERS[f]) for f, prompt in prompts.items()}
            stem = "pretrained" if name == "pretrained" else "finetuned-0.1"
            saved = json.loads((root / "out" / "dev" / f"{stem}{'' if style == 'question' else '-' + style}.probe.json").read_text())["ranks"]
            assert saved == ranks, (name, style)
            for protocol in ("all_objects", "single_token"):  # the tiny tokenizer makes every object one token
                row = probe["models"][name][style][protocol]
                assert row["n"] == 3
                for k in (1, 3, 5, 10):
                    assert row[f"top{k}"]["mean"] == pytest.approx(sum(r <= k for r in ranks.values()) / 3), (name, style, protocol, k)
    assert results["alphas"]["0.1"]["probe"]["pretrained"]["top1"] == probe["models"]["pretrained"]["question"]["all_objects"]["top1"]
    assert results["coverage"]["matches"]["articles"]["overall"]["subjects"] == {"total": 6, "present": 3, "share": 0.5}  # see test_facts_coverage
    text = (root / "out" / "dev" / "results.md").read_text()
    assert "| finetuned@0.1 | evidence | one-token objects (the seed's protocol) | 3 |" in text
    assert "LAMA probing of the dev facts" in text and "Corpus coverage" in text


def test_a_rerun_reuses_the_probe_and_coverage_stages(trex_run):
    _, _, first, second = trex_run
    assert first["stages"]["coverage"] == "computed" and first["stages"]["dev/probe-finetuned-0.1-cloze"] == "computed"
    assert {stage for stage, how in second["stages"].items() if how == "computed"} == set()
    assert second["lama_probe"] == first["lama_probe"] and second["coverage"] == first["coverage"]


def _lama_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "lama"
    shutil.copytree(LAMA, copy)
    return copy


def _flags(tmp_path: Path, lama: Path, *extra: str) -> list[str]:
    model = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    return ["bench", "fact-tracing", "--out", str(tmp_path / "out"), "--data", "trex-lama", "--trex", str(TREX), "--lama", str(lama / "TREx"),
            "--model", str(model), "--max-length", "32", "--device", "cpu", "--alphas", "0.1", *extra]


def test_a_missing_evidences_field_is_refused_before_any_fine_tuning(tmp_path, capsys):
    from pretrace.cli import main

    lama = _lama_copy(tmp_path)
    path = lama / "TREx" / "P36.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "evidences"}) + "\n" for r in rows))
    assert_refused(main(_flags(tmp_path, lama)), capsys, "no 'evidences' field", "--probe-styles")
    assert not (tmp_path / "out" / "alpha-0.1").exists() and not (tmp_path / "out" / "coverage.json").exists()
    assert main(_flags(tmp_path, lama, "--probe-styles", "cloze")) == 0  # without the evidence style the run goes ahead


def test_a_relation_without_a_cloze_template_is_refused_before_any_fine_tuning(tmp_path, capsys):
    from pretrace.cli import main

    lama = _lama_copy(tmp_path)
    path = lama / "relations.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if '"P36"' not in line))
    assert_refused(main(_flags(tmp_path, lama)), capsys, "relations P36 of the queried facts have no cloze template", "--cloze-templates")
    assert not (tmp_path / "out" / "alpha-0.1").exists()
    path.unlink()
    assert_refused(main(_flags(tmp_path, lama)), capsys, "relations.jsonl: no such file", "--cloze-templates")


def test_a_folder_benchmark_needs_its_cloze_templates(tmp_path, capsys):
    from pretrace.cli import main
    from test_facts_run import tiny_benchmark

    tiny_benchmark().write(tmp_path / "benchmark")
    model = save_tiny_model(tmp_path / "model", "llama", dtype=torch.float32)
    flags = ["bench", "fact-tracing", "--out", str(tmp_path / "out"), "--data", "folder", "--benchmark", str(tmp_path / "benchmark"), "--model", str(model),
             "--max-length", "32", "--device", "cpu"]
    assert_refused(main(flags), capsys, "--data folder: no cloze templates", "--cloze-templates", "--probe-styles")
    assert not list((tmp_path / "out").glob("alpha-*"))
