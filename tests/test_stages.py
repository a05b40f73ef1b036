"""The stage cache: a changed input recomputes exactly its stage and what lies downstream of it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrace.config import from_flags, with_flags
from pretrace.bench.facts.run import FactTracingSettings, _Run, run_fact_tracing
from pretrace.errors import PretraceError
from pretrace.stages import File, Folder, StageCache
from test_facts_run import tiny_benchmark, write_cloze
from test_facts_trex_lama import LAMA, TREX
from tiny import save_tiny_model, write_jsonl


def test_digests_follow_file_contents_folders_settings_and_upstream_stages(tmp_path):
    data, model = tmp_path / "data.jsonl", tmp_path / "model"
    data.write_text("a\n")
    model.mkdir()
    (model / "w").write_text("1")
    cache = StageCache(tmp_path / "run")
    upstream = cache.key("up", data=File(data))
    base = cache.key("down", up=upstream, model=Folder(model), lr=1e-3)
    assert cache.key("down", up=upstream, model=Folder(model), lr=1e-3).digest == base.digest
    assert cache.key("down", up=upstream, model=Folder(model), lr=2e-3).digest != base.digest
    data.write_text("b\n")  # same name, other contents: the upstream digest and so the downstream one change
    assert cache.key("down", up=cache.key("up", data=File(data)), model=Folder(model), lr=1e-3).digest != base.digest
    (model / "w").write_text("22")
    assert cache.key("down", up=upstream, model=Folder(model), lr=1e-3).digest != base.digest


def test_a_stage_is_reused_only_with_its_digest_and_outputs_and_stale_outputs_are_removed(tmp_path):
    run = tmp_path / "run"
    output = run / "out.txt"
    cache = StageCache(run)
    key = cache.key("stage", x=1)
    assert cache.stale(key, output)
    output.write_text("done")
    cache.record(key)
    again = StageCache(run)  # a new process reads stages.json
    assert not again.stale(again.key("stage", x=1), output) and again.statuses == {"stage": "reused"}
    assert again.stale(again.key("stage", x=2), output) and not output.exists()  # other inputs: the old output goes
    output.write_text("half")  # killed before record(): the same inputs keep it, for a stage that resumes on its own
    resumed = StageCache(run)
    assert resumed.stale(resumed.key("stage", x=2), output) and output.read_text() == "half"
    assert resumed.stale(resumed.key("stage", x=3), output) and not output.exists()
    assert json.loads((run / "stages.json").read_text())["stage"]["done"] is False
    with pytest.raises(PretraceError, match="outside its run folder"):
        again.stale(again.key("stage", x=3), tmp_path / "elsewhere.txt")


@pytest.fixture(scope="module")
def run_settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    tiny_benchmark().write(root / "benchmark")
    model = save_tiny_model(root / "model", "llama", dtype=torch.float32)
    return root, from_flags(FactTracingSettings, out=str(root / "out"), data="folder", benchmark=str(root / "benchmark"), model=str(model),
                                     cloze_templates=write_cloze(root / "cloze.jsonl"), queries=3, candidates=3, random_candidates=4, sharing_candidates=2, top=10, query_rank=2,
                                     finetune_facts=0, alphas="0.1", lr=1e-3, epochs=1, fit_sentences=6, preset="all", last_layers=1,
                                     batch_size=4, max_length=32, device="cpu", bootstrap=100)


def _computed(results: dict) -> set[str]:
    return {stage for stage, how in results["stages"].items() if how == "computed"}


def test_fact_tracing_recomputes_exactly_the_stages_a_change_affects(run_settings):

    root, settings = run_settings
    first = run_fact_tracing(settings)
    scores = {"scores-finetuned@0.1/0000", "scores-pretrained/0000"}
    probes_pt = {"probe-pretrained", "probe-pretrained-evidence", "probe-pretrained-cloze"}
    finetuned = {"finetune@0.1", "factors-finetuned@0.1", *scores, "embedding@0.1", "probe-finetuned-0.1", "probe-finetuned-0.1-evidence",
                 "probe-finetuned-0.1-cloze"}
    everything = {"finetune-data", "fit-sentences", "factors-pretrained", "bm25", "coverage", *probes_pt, *finetuned}
    assert _computed(first) == everything
    assert _computed(run_fact_tracing(settings)) == set()

    # a fine-tuning setting: the fine-tuned model and all that reads it, not the pre-trained side
    changed = run_fact_tracing(with_flags(settings, lr=2e-3))
    assert _computed(changed) == finetuned
    assert changed["stage_digests"]["factors-pretrained"] == first["stage_digests"]["factors-pretrained"]

    # scoring settings: only the gradient scores that read them (H_pt's damping: not fine-tuned-only, damped by α)
    assert _computed(run_fact_tracing(with_flags(settings, lr=2e-3, damping_factor=0.5))) == {"scores-pretrained/0000"}
    assert _computed(run_fact_tracing(with_flags(settings, lr=2e-3, damping_factor=0.5, query_rank=3))) == scores
    # another α: its own fine-tune and everything of it, and the shared pre-trained pass; the first α's stages are kept
    both = run_fact_tracing(with_flags(settings, lr=2e-3, damping_factor=0.5, query_rank=3, alphas="0.1,0.2"))
    assert _computed(both) == {name.replace("0.1", "0.2") for name in finetuned} | {"scores-pretrained/0000"}

    # the benchmark's contents (same folder name): everything downstream of it
    benchmark = tiny_benchmark()
    benchmark.sentences[5] = type(benchmark.sentences[5])(5, "a dog ran in the big park .", benchmark.sentences[5].facts)
    shutil.rmtree(root / "benchmark")
    benchmark.write(root / "benchmark")
    rerun = run_fact_tracing(with_flags(settings, lr=2e-3, damping_factor=0.5, query_rank=3))
    assert _computed(rerun) == everything - probes_pt  # the pre-trained model, questions, templates and evidence sentences unchanged
    assert rerun["stages"]["benchmark"] == "read"


def test_trex_lama_benchmark_is_rebuilt_when_the_question_templates_change(tmp_path):
    questions = tmp_path / "questions.jsonl"
    shutil.copy(LAMA / "bloom_questions.jsonl", questions)
    settings = from_flags(FactTracingSettings, out=str(tmp_path / "out"), data="trex-lama", trex=str(TREX), lama=str(LAMA / "TREx"), questions=str(questions))
    first = _Run(settings)
    asked = {f.fact_id: f.prompt for f in first.benchmark()[0].facts}
    assert first.cache.statuses["benchmark"] == "computed"
    again = _Run(settings)
    again.benchmark()
    assert again.cache.statuses["benchmark"] == "reused"
    rows = [json.loads(line) for line in questions.read_text().splitlines() if line.strip()]
    for row in rows:
        for field in ("question", "template", "prompt"):
            if isinstance(row.get(field), str) and "[X]" in row[field]:
                row[field] = "tell me: " + row[field]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = _Run(settings)
    rebuilt = {f.fact_id: f.prompt for f in changed.benchmark()[0].facts}
    assert changed.cache.statuses["benchmark"] == "computed"
    assert rebuilt.keys() == asked.keys() and all("tell me: " in rebuilt[k] and "tell me: " not in asked[k] for k in asked)


def test_trace_recomputes_exactly_the_stages_a_change_affects(tmp_path):

    from pretrace.training.finetune import FinetuneSettings, finetune
    from pretrace.workflows.trace import trace
    from test_trace import CORPUS, OPTIONS, PAIRS, QUERIES, _settings

    save_tiny_model(tmp_path / "pt", "gpt_neox", dtype=torch.float64)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    finetune(FinetuneSettings(model=str(tmp_path / "pt"), data=pairs, out=str(tmp_path / "ft"), alpha=0.05, lr=1e-2, epochs=1,
                              batch_size=2, dtype="float64", device="cpu"), progress=False)
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS)])
    write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    settings = _settings(tmp_path, "out", retriever="bm25")
    computed = lambda summary: {name for name, how in summary["stages"].items() if how == "computed"}  # noqa: E731
    everything = {"queries", "index", "retrieval", "factors-pretrained", "factors-finetuned", "scores", "results"}
    assert computed(trace(settings, OPTIONS, progress=False)) == everything
    assert computed(trace(settings, OPTIONS, progress=False)) == set()
    fewer = _settings(tmp_path, "out", retriever="bm25", candidates=5)
    damped = _settings(tmp_path, "out", retriever="bm25", candidates=5, damping_factor=0.5)
    assert computed(trace(fewer, OPTIONS, progress=False)) == {"retrieval", "scores", "results"}
    assert computed(trace(damped, OPTIONS, progress=False)) == {"scores", "results"}
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(CORPUS[:-1])])  # same file name
    assert computed(trace(damped, OPTIONS, progress=False)) == \
        {"index", "retrieval", "factors-pretrained", "scores", "results"}


def test_demo_recomputes_exactly_the_stages_a_change_affects(tmp_path):
    from pretrace.cli import main
    from test_reference_workflows import DEMO

    out = tmp_path / "demo"
    digests = lambda: {k: v["digest"] for k, v in json.loads((out / "stages.json").read_text()).items() if k != "checksum"}  # noqa: E731
    assert main(["demo", "--out", str(out), *DEMO, "--candidates", "90"]) == 0
    first = digests()
    assert set(first) == {"world", "pretrain", "finetune", "factors_pretrained", "factors_finetuned", "scores_ekfac", "scores_identity"}
    assert main(["demo", "--out", str(out), *DEMO, "--candidates", "90", "--alpha", "0.02"]) == 0
    changed = {k for k, v in digests().items() if v != first[k]}
    assert changed == {"finetune", "factors_finetuned", "scores_ekfac", "scores_identity"}


def test_trex_lama_benchmark_is_rebuilt_when_a_lama_file_changes_in_place(tmp_path):
    """Keyed by contents: an edit that keeps the file's size and modification time is still seen."""
    import os

    lama = tmp_path / "TREx"
    shutil.copytree(LAMA / "TREx", lama)
    settings = from_flags(FactTracingSettings, out=str(tmp_path / "out"), data="trex-lama", trex=str(TREX), lama=str(lama))
    _Run(settings).benchmark()
    file = sorted(lama.glob("P*.jsonl"))[0]
    stat, text = file.stat(), file.read_text()
    edited = text.replace("Paris", "Parix", 1)
    assert edited != text and len(edited) == len(text)
    file.write_text(edited)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = _Run(settings)
    again.benchmark()
    assert again.cache.statuses["benchmark"] == "computed"
