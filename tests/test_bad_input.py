"""Bad input is refused before any work, with exit code 2, a message naming the problem and its fix, no traceback,
no output folder and untouched inputs (issue #18). One table row per reproduced defect."""

import hashlib
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pretrace.config import from_flags
from pretrace.bench.demo import DemoSettings
from pretrace.cli import main
from pretrace.errors import PretraceError
from pretrace.training.finetune import FinetuneSettings
from pretrace.workflows.score import ScoreSettings
from pretrace.workflows.trace import TraceSettings
from tiny import SENTENCES, save_tiny_model, tiny_config, train_tokenizer, write_jsonl

PAIRS = [("the capital of france is", " paris ."), ("birds can", " fly ."), ("fish can", " swim .")]
NOT_UTF8 = b'{"text": "the cat sat"}\n{"text": "caf\xe9 au lait"}\n'


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny GPT-2 (64 positions) with factors, a fine-tuned copy with its factors, an index, and broken model folders."""
    root = tmp_path_factory.mktemp("bad_input")
    save_tiny_model(root / "model", "gpt2", dtype=torch.float32)
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"id": "q0", "prompt": "paris is the capital of", "completion": " france ."}])
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    common = ["--device", "cpu", "--batch-size", "4"]
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "factors"), *common]) == 0
    assert main(["finetune", "--model", str(root / "model"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned"),
                 "--alpha", "0.1", "--epochs", "1", "--device", "cpu"]) == 0
    assert main(["fit", "--model", str(root / "tuned"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "tuned_factors"), *common]) == 0
    assert main(["index", "--model", str(root / "model"), "--train", str(root / "docs.jsonl"), "--out", str(root / "index"),
                 "--max-length", "32", "--preset", "mlp", *common]) == 0

    from transformers import BertConfig, BertForMaskedLM

    tokenizer = train_tokenizer()
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    save_tiny_model(root / "no_tokenizer", "gpt2", dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "no_tokenizer" / name).unlink(missing_ok=True)
    shutil.copytree(root / "model", root / "missing_weights")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(root / "missing_weights" / "model.safetensors"))
    del weights[next(k for k in weights if k.endswith("mlp.c_fc.weight"))]
    save_file(weights, str(root / "missing_weights" / "model.safetensors"), metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer) - 8))
    small.save_pretrained(root / "small_vocab")
    tokenizer.save_pretrained(root / "small_vocab")

    bad = root / "bad"
    bad.mkdir()
    (bad / "latin1.jsonl").write_bytes(NOT_UTF8)
    (bad / "empty.jsonl").write_text("")
    (bad / "null_text.jsonl").write_text('{"text": "the cat sat"}\n{"id": "x", "text": null}\n')
    write_jsonl(bad / "dup_docs.jsonl", [{"id": "a", "text": "the cat sat ."}, {"id": "a", "text": "the dog ran ."}])
    write_jsonl(bad / "dup_queries.jsonl", [{"id": "a", "text": "the cat sat ."}, {"id": "a", "text": "the dog ran ."}])
    write_jsonl(bad / "prompt_and_text.jsonl", [{"prompt": "the cat", "completion": " sat .", "text": "the cat sat ."}])
    write_jsonl(bad / "short_query.jsonl", [{"id": "q", "text": "cat"}])
    write_jsonl(bad / "pair_as_document.jsonl", [{"text": "the cat sat .", "prompt": "the cat", "completion": " sat ."}])
    write_jsonl(bad / "mixed.jsonl", [{"text": "the cat sat ."}] * 3 + [{"prompt": "the cat", "completion": " sat ."}])
    rows = [{"id": f"d{i}", "text": SENTENCES[i % len(SENTENCES)]} for i in range(1000)]
    (bad / "line1001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"txt": "oops"}\n')
    return root


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under the workspace's inputs, to prove a refused command changed none of them."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _score(ws, *extra, queries="q.jsonl", train="docs.jsonl"):
    return ["score", "--model", str(ws / "model"), "--factors", str(ws / "factors"), "--queries", str(ws / queries),
            "--train", str(ws / train), "--device", "cpu", *extra]


def _multi(ws, *extra, models=("model", "tuned"), factors=("factors", "tuned_factors")):
    (pt, ft), (fpt, fft) = models, factors
    return ["score", "--pretrained", str(ws / pt), "--finetuned", str(ws / ft), "--pretrained-factors", str(ws / fpt),
            "--finetuned-factors", str(ws / fft), "--queries", str(ws / "q.jsonl"), "--train", str(ws / "docs.jsonl"), "--device", "cpu", *extra]


def _fit(ws, model="model", data="docs.jsonl", *extra):
    return ["fit", "--model", str(ws / model), "--data", str(ws / data), "--device", "cpu", *extra]


def _trace(ws, *extra):
    return ["trace", "--pretrained", str(ws / "model"), "--finetuned", str(ws / "tuned"), "--corpus", str(ws / "docs.jsonl"),
            "--queries", str(ws / "q.jsonl"), "--retriever", "none", "--device", "cpu", *extra]


def _finetune(ws, model="model", data="pairs.jsonl", *extra, alpha="0.1"):
    return ["finetune", "--model", str(ws / model), "--data", str(ws / data), "--alpha", alpha, "--epochs", "1", "--device", "cpu", *extra]


# (row id, argv without --out, regex the message must match: the problem and its fix)
ROWS = [
    # 2. NaN / inf options
    ("damping-nan", lambda ws: _score(ws, "--damping", "nan"), r"--damping must be a finite number > 0, got nan"),
    ("damping-inf", lambda ws: _score(ws, "--damping", "inf"), r"--damping must be a finite number > 0, got inf"),
    ("damping-factor-nan", lambda ws: _score(ws, "--damping-factor", "nan"), r"--damping-factor must be a finite number > 0"),
    ("alpha-nan", lambda ws: _multi(ws, "--alpha", "nan"), r"--alpha must be a finite number > 0, got nan"),
    ("alpha-inf", lambda ws: _multi(ws, "--alpha", "inf"), r"--alpha must be a finite number > 0, got inf"),
    ("finetuned-damping-nan", lambda ws: _multi(ws, "--finetuned-damping", "nan"), r"--finetuned-damping must be a finite number > 0"),
    ("finetune-alpha-nan", lambda ws: _finetune(ws, alpha="nan"), r"--alpha must be a finite number >= 0.*got nan"),
    # 3. records across stages
    ("index-max-length", lambda ws: _score(ws, "--index", str(ws / "index"), "--preset", "mlp"), r"built with --max-length 32.*pass --max-length 32"),
    ("index-preset", lambda ws: _score(ws, "--index", str(ws / "index"), "--max-length", "32"), r"built with --preset mlp, but this run uses --preset all; pass --preset mlp"),
    ("index-modules", lambda ws: _score(ws, "--index", str(ws / "index"), "--max-length", "32", "--preset", "mlp", "--modules", r"h\.0\."),
     r"built without --modules, but this run uses --modules h\\.0\\.; drop --modules"),
    ("index-attention-blocks", lambda ws: _score(ws, "--index", str(ws / "index"), "--max-length", "32", "--preset", "mlp", "--attention-blocks", "head"),
     r"built with --attention-blocks layer, but this run uses --attention-blocks head; pass --attention-blocks layer"),
    ("multi-stage-swapped", lambda ws: _multi(ws, "--alpha", "0.1", models=("tuned", "model"), factors=("tuned_factors", "factors")),
     r"swapped; swap --pretrained with --finetuned"),
    ("factors-swapped", lambda ws: _multi(ws, factors=("tuned_factors", "factors")),
     r"--pretrained-factors .* fitted on a different model than --pretrained.*pass the factors fitted on that model"),
    ("dtype-change", lambda ws: _score(ws, "--dtype", "bfloat16"), r"fitted with --dtype float32, and --model .* loaded as bfloat16 has other weights; pass --dtype float32"),
    # 5. wrong models
    ("bert-fit", lambda ws: _fit(ws, "bert"), r"BertForMaskedLM, not a causal language model; pass a model with a causal LM head"),
    ("bert-score", lambda ws: _score(ws)[:1] + ["--model", str(ws / "bert")] + _score(ws)[3:], r"not a causal language model"),
    ("bert-finetune", lambda ws: _finetune(ws, "bert"), r"not a causal language model"),
    ("missing-weights", lambda ws: _fit(ws, "missing_weights"), r"lack or mis-shape 1 parameter.*mlp\.c_fc\.weight.*save the complete model"),
    ("no-tokenizer", lambda ws: _fit(ws, "no_tokenizer"), r"has no tokenizer.*tokenizer\.save_pretrained"),
    ("small-vocabulary", lambda ws: _fit(ws, "small_vocab"), r"the tokenizer has \d+ tokens but the model embeds only \d+.*resize_token_embeddings"),
    ("max-length-over-positions", lambda ws: _fit(ws, "model", "docs.jsonl", "--max-length", "100"), r"--max-length 100 exceeds the 64 positions.*pass --max-length 64 or less"),
    ("finetune-max-length", lambda ws: _finetune(ws, "model", "pairs.jsonl", "--max-length", "100"), r"exceeds the 64 positions"),
    # 6. validation before any work
    ("malformed-line-1001", lambda ws: _fit(ws, "model", "bad/line1001.jsonl"), r"line1001\.jsonl:1001: missing field 'text'"),
    ("index-line-1001", lambda ws: ["index", "--model", str(ws / "model"), "--train", str(ws / "bad/line1001.jsonl"), "--device", "cpu"],
     r"line1001\.jsonl:1001: missing field 'text'"),
    ("score-line-1001", lambda ws: _score(ws, train="bad/line1001.jsonl"), r"line1001\.jsonl:1001: missing field 'text'"),
    # 7. tracebacks
    ("non-utf8-fit", lambda ws: _fit(ws, "model", "bad/latin1.jsonl"), r"latin1\.jsonl:2: not UTF-8.*re-encode the file as UTF-8"),
    ("non-utf8-train", lambda ws: _score(ws, train="bad/latin1.jsonl"), r"latin1\.jsonl:2: not UTF-8"),
    ("non-utf8-queries", lambda ws: _score(ws, queries="bad/latin1.jsonl"), r"latin1\.jsonl:2: not UTF-8"),
    ("non-utf8-finetune", lambda ws: _finetune(ws, "model", "bad/latin1.jsonl"), r"latin1\.jsonl:2: not UTF-8"),
    # 8. misleading words, and one rule for all files
    ("empty-fit-data", lambda ws: _fit(ws, "model", "bad/empty.jsonl"), r"empty\.jsonl: no records; the file is empty"),
    ("empty-train", lambda ws: _score(ws, train="bad/empty.jsonl"), r"empty\.jsonl: no documents; the file is empty"),
    ("text-null", lambda ws: _fit(ws, "model", "bad/null_text.jsonl"), r"null_text\.jsonl:2: field 'text' is null; give it a string"),
    ("duplicate-document-ids", lambda ws: _score(ws, train="bad/dup_docs.jsonl"), r"dup_docs\.jsonl:2: document id 'a' already appears at \S*dup_docs\.jsonl:1; ids must be unique"),
    ("duplicate-query-ids", lambda ws: _score(ws, queries="bad/dup_queries.jsonl"), r"dup_queries\.jsonl:2: query id 'a' already appears at \S*dup_queries\.jsonl:1"),
    ("duplicate-fitting-ids", lambda ws: _fit(ws, "model", "bad/dup_docs.jsonl"), r"dup_docs\.jsonl:2: record id 'a' already appears at \S*dup_docs\.jsonl:1"),
    ("prompt-and-text", lambda ws: _score(ws, queries="bad/prompt_and_text.jsonl"), r"has both 'text' and 'prompt'/'completion'; give either"),
    ("mixed-fit-data", lambda ws: _fit(ws, "model", "bad/mixed.jsonl"), r"mixed\.jsonl:4: a prompt/completion pair, but \S*mixed\.jsonl:1 is a bare 'text' record; give one kind per source"),
    ("short-query", lambda ws: _score(ws, queries="bad/short_query.jsonl"), r"query 'q' has fewer than 2 tokens.*give a longer 'text'"),
    ("pair-as-document", lambda ws: _score(ws, train="bad/pair_as_document.jsonl"), r"pair_as_document\.jsonl:1: has 'prompt'/'completion' where a training document is expected"),
    ("demo-ptb-sentences", lambda ws: ["demo", "--ptb-sentences", "-5"], r"--ptb-sentences must be at least 1, got -5"),
    ("demo-alpha", lambda ws: ["demo", "--alpha", "nan"], r"--alpha must be a finite number > 0, got nan"),
    # trace refuses what its scoring stage would, before generating completions, retrieving or fitting
    ("trace-damping-nan", lambda ws: _trace(ws, "--damping", "nan"), r"--damping must be a finite number > 0, got nan"),
    ("trace-alpha-zero", lambda ws: _trace(ws, "--alpha", "0"), r"--alpha must be a finite number > 0, got 0"),
    ("trace-finetuned-damping-inf", lambda ws: _trace(ws, "--finetuned-damping", "inf"), r"--finetuned-damping must be a finite number > 0, got inf"),
    ("trace-damping-factor-negative", lambda ws: _trace(ws, "--damping-factor", "-1"), r"--damping-factor must be a finite number > 0, got -1"),
    ("trace-candidates", lambda ws: _trace(ws, "--candidates", "0"), r"--candidates must be at least 1, got 0"),
    ("trace-duplicate-corpus-ids", lambda ws: _trace(ws)[:6] + [str(ws / "bad/dup_docs.jsonl")] + _trace(ws)[7:],
     r"dup_docs\.jsonl:2: document id 'a' already appears .*ids must be unique"),
]
if not torch.cuda.is_available():
    ROWS.append(("device-cuda", lambda ws: _fit(ws)[:-2] + ["--device", "cuda"], r"--device cuda: CUDA is not available.*pass --device cpu"))


@pytest.mark.parametrize("argv,pattern", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_refused_cleanly(ws, tmp_path, capsys, argv, pattern):
    before = _fingerprint(ws)
    out = tmp_path / "out"
    code = main([*argv(ws), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(pattern, err, re.S), err
    assert not re.search(r"covariances|indexing|scoring|epoch", err), "the refusal came after model work started"
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a refused command left output behind"
    assert _fingerprint(ws) == before, "a refused command changed its inputs"


def test_non_finite_scores_are_never_written(ws, tmp_path):
    """The one place scores are written refuses NaN/inf, whichever method produced them."""
    from pretrace.scores.result import ScoreResult
    from pretrace.modeling.stage import ModelOptions
    from pretrace.workflows.score import score

    from pretrace.methods.base import Attributor

    class NaNScores(Attributor):
        def fit(self, context):
            pass

        def score(self, context, per_module=False, per_token=False):
            ids = [f"d{i}" for i in range(len(SENTENCES))]
            return ScoreResult(scores=torch.full((1, len(ids)), float("nan"), dtype=torch.float64), query_ids=["q0"], document_ids=ids, module_names=[])

        def hyperparameters(self):
            return {}

    settings = from_flags(ScoreSettings, model=str(ws / "model"), queries=str(ws / "q.jsonl"), train=str(ws / "docs.jsonl"),
                          out=str(tmp_path / "out"), method="gradient-cosine")
    with pytest.raises(PretraceError, match=r"8 of 8 values in 'scores' \(--method gradient-cosine\) are NaN or infinite.*nothing was written.*--dtype float32"):
        score(settings, ModelOptions(device="cpu"), attributor=NaNScores())
    assert not (tmp_path / "out").exists()


def test_short_documents_are_skipped_in_fit_and_score_zero(ws, tmp_path, capsys):
    """A one-token document (common in real corpora) is left out of the curvature with one counted warning, and
    scored 0 and listed as too_short in scores.json, instead of aborting the run."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "long", "text": SENTENCES[2]}, {"id": "short", "text": "cat"}, {"id": "other", "text": SENTENCES[0]}])
    with pytest.warns(UserWarning, match=r"1 of 3 documents had fewer than 2 tokens.*skipped"):
        assert main(["fit", "--model", str(ws / "model"), "--data", docs, "--out", str(tmp_path / "f"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "f" / "factors.json").read_text())["documents"] == 2
    with pytest.warns(UserWarning, match=r"1 of 3 documents have fewer than 2 tokens.*scores are 0"):
        assert main(["score", "--model", str(ws / "model"), "--queries", str(ws / "q.jsonl"),
                     "--train", docs, "--out", str(tmp_path / "s"), "--device", "cpu", "--method", "gradient-cosine"]) == 0
    meta = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert meta["too_short"] == ["short"] and meta["options"]["max_length"] == 64
    from safetensors.torch import load_file

    scores = load_file(str(tmp_path / "s" / "scores.safetensors"))["scores"]
    assert scores[0, 1] == 0 and torch.isfinite(scores).all() and (scores[0, [0, 2]] != 0).all()
    # a method that reads words, not the loss, scores the one-token document like any other (declared by the method)
    assert main(["score", "--queries", str(ws / "q.jsonl"), "--train", docs, "--out", str(tmp_path / "b"), "--method", "bm25"]) == 0
    assert json.loads((tmp_path / "b" / "scores.json").read_text())["too_short"] == []


def _nan_model(ws, folder: Path) -> Path:
    """A copy of the tiny model whose final layer norm is NaN: every loss is NaN at the first batch."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(ws / "model", folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_fit_refused_at_its_first_batch_leaves_no_checkpoint_and_no_circular_dtype_hint(ws, tmp_path, capsys):
    """The checkpoint folder is created by the first save, not up front: a fit refused before one leaves nothing beside
    --out; and a float32 model is not told to try --dtype float32."""
    model = _nan_model(ws, tmp_path / "nan_model")
    out = tmp_path / "out"
    code = main(_fit(ws, str(model)) + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"the loss is NaN or infinite for some sequence; check the model weights \(or load the model with --dtype float64\)", err), err
    assert "--dtype float32" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a refused fit left a checkpoint folder behind"


def test_a_fit_with_nothing_to_fit_on_leaves_no_checkpoint(ws, tmp_path, capsys):
    """Only one-token documents: refused with the fix, and no checkpoint of empty sums is saved for a 'resume'."""
    docs = write_jsonl(tmp_path / "short.jsonl", [{"id": "a", "text": "cat"}, {"id": "b", "text": "dog"}])
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"2 of 2 documents had fewer than 2 tokens"):
        code = main(["fit", "--model", str(ws / "model"), "--data", docs, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"no documents to fit on \(each needs at least 2 tokens\); pass a file with longer documents", err), err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a refused fit left a checkpoint behind"


def test_overflowing_factors_suggest_a_wider_model_dtype_than_float32(ws, tmp_path, capsys):
    """float16 factors of a float32 model that overflow: the hint is --factor-dtype, or --dtype float64, never the
    --dtype float32 the model already has."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "loud"
    shutil.copytree(ws / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    for name in [k for k in weights if k.endswith(("ln_1.weight", "ln_2.weight"))]:
        weights[name] = weights[name] * 1000  # activations ~1e3: their covariances exceed float16's 65504
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code = main(_fit(ws, str(model)) + ["--factor-dtype", "float16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"NaN or infinite values in float16; nothing was written\. Store the factors with --factor-dtype float32 or float64 "
                     r"\(or load the model with --dtype float64\)", err), err
    assert "--dtype float32" not in err
    assert not (tmp_path / "out").exists()


def test_trace_checks_and_locks_its_run_folder_but_resumes_a_non_empty_one(ws, tmp_path, capsys):
    """trace's --out goes through the shared pre-flight check (never an input folder) and lock, in the mode for run
    folders: a second trace on the same --out is refused, while an existing run folder is not refused as non-empty."""
    from pretrace.storage import mark_folder, output_folder

    before = _fingerprint(ws)
    code = main([*_trace(ws), "--out", str(ws / "model")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "is the input folder --pretrained" in err, err
    code = main([*_trace(ws), "--out", str(ws / "tuned" / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "is inside the input folder --finetuned" in err, err
    assert _fingerprint(ws) == before and not (ws / "tuned" / "run").exists()

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("a previous run's folder")
    mark_folder(out, "trace", manifest=False)
    with output_folder(out, False, command="trace", resume=True):  # another live trace holds the run folder
        code = main([*_trace(ws), "--out", str(out)])
        err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"another pretrace process \(pid \d+\) is writing this --out; wait for it to finish or choose another --out", err), err
    assert sorted(p.name for p in out.iterdir()) == [".pretrace.json", "notes.txt"], "the refused trace wrote into the locked run folder"
    with output_folder(out, False, command="trace", resume=True) as checked:  # unlocked again, and non-empty is fine for a run folder
        assert checked == out


def test_demo_checks_its_run_folder_before_any_work(tmp_path, capsys):
    """An --out that is a file is refused by the shared check, not with a FileExistsError traceback."""
    out = tmp_path / "demo"
    out.write_text("not a folder")
    code = main(["demo", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{out}: exists and is not a folder; choose another --out" in err
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("command,resumes", [("score", True), ("finetune", False), ("fit", True)])  # score resumes from its checkpoint parts
def test_interrupt_promises_a_resume_only_where_there_is_one(ws, tmp_path, capsys, monkeypatch, command, resumes):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = {"score": "pretrace.workflows.score", "finetune": "pretrace.training.finetune", "fit": "pretrace.workflows.fit"}[command]
    importlib.import_module(module)
    monkeypatch.setattr(sys.modules[module], command, interrupted)  # pretrace.training.finetune is also a function's name
    argv = {"score": _score(ws), "finetune": _finetune(ws), "fit": _fit(ws)}[command]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert ("re-run the same command to resume" in err) == resumes
    assert resumes or "does not resume" in err


def test_a_nan_score_folder_is_flagged_by_inspect_and_refused_by_report(ws, tmp_path, capsys):
    """A folder written before scores were checked: `inspect` says so instead of printing `min nan`, and `report`
    refuses before writing report.html."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "s"
    assert main([*_score(ws), "--out", str(folder)]) == 0
    tensors = load_file(str(folder / "scores.safetensors"))
    tensors["scores"][0, 0] = float("nan")
    save_file(tensors, str(folder / "scores.safetensors"))
    from pretrace.storage import mark_folder

    mark_folder(folder, "score", manifest=True)  # a matching manifest: the NaN itself must be caught
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1 NaN or infinite values" in out and "recompute with `pretrace score`" in out and "min nan" not in out
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "1 of 8 values in 'scores'" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("build,pattern", [
    (lambda: from_flags(ScoreSettings, queries="q", train="t", out="o", damping=float("nan")), r"--damping must be a finite number > 0"),
    (lambda: from_flags(ScoreSettings, queries="q", train="t", out="o", method="trak", trak_subset_fraction=1.5), r"--trak-subset-fraction must be a finite number > 0 and <= 1"),
    (lambda: FinetuneSettings(model="m", data="d", out="o", alpha=float("inf")), r"--alpha must be a finite number >= 0"),
    (lambda: DemoSettings(query_facts=60), r"--query-facts must be below --facts=60"),
    (lambda: from_flags(TraceSettings, pretrained="p", finetuned="f", corpus="c", queries="q", out="o", alpha=float("nan")), r"--alpha must be a finite number > 0"),
    (lambda: from_flags(TraceSettings, pretrained="p", finetuned="f", corpus="c", queries="q", out="o", damping=-0.5), r"--damping must be a finite number > 0"),
], ids=["score-damping", "score-subset-fraction", "finetune-alpha", "demo-query-facts", "trace-alpha", "trace-damping"])
def test_the_python_api_gets_the_same_checks(build, pattern):
    """The checks live in the settings dataclasses, so the API and pipeline files get them as well as the CLI."""
    with pytest.raises(PretraceError, match=pattern):
        build()
