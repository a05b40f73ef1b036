"""The memory plan made before any model work: its predictions against peaks measured in fresh processes, its
refusal (exit 2, before a weight is read), `--batch-size auto`, and half-precision models against float32."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import SENTENCES, assert_refused, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A GPT-NeoX large enough that its passes, not the interpreter, set the peak (hidden 256, 4 layers, vocabulary
    4096, 128-token documents), with documents and queries."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrace.data.bpe import train_bpe

    root = tmp_path_factory.mktemp("plan")
    words = " ".join(SENTENCES).split()
    texts = [" ".join(words[(7 * i + j) % len(words)] for j in range(90)) for i in range(64)]
    tokenizer = train_bpe(texts + SENTENCES, vocab_size=600)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                           max_position_embeddings=256, rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    write_jsonl(root / "q.jsonl", [{"prompt": t[:60], "completion": " " + t[60:90]} for t in texts[:8]])
    return root


def _run(root: Path, *argv: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pretrace", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr


def _ratio(stderr: str) -> float:
    return float(re.search(r"peak memory: measured [\d.]+ GB, planned [\d.]+ GB \(([\d.]+)x\)", stderr).group(1))


@pytest.mark.parametrize("batch", [4, 32])
def test_plans_predict_measured_peaks_within_a_fifth(planned, batch):
    """fit, then score against those factors, each in a fresh process: the measured peak within 20% of the plan (the
    plan is an estimate: its parts are upper bounds of what is held, the interpreter's arenas a measured constant)."""
    common = ["--batch-size", str(batch), "--max-length", "128", "--device", "cpu"]
    code, err = _run(planned, "fit", "--model", str(planned / "model"), "--data", str(planned / "docs.jsonl"), "--out", str(planned / f"f{batch}"), *common)
    assert code == 0, err[-2000:]
    assert 0.8 <= _ratio(err) <= 1.2, err[-600:]
    code, err = _run(planned, "score", "--model", str(planned / "model"), "--factors", str(planned / f"f{batch}"), "--queries", str(planned / "q.jsonl"),
                     "--train", str(planned / "docs.jsonl"), "--out", str(planned / f"s{batch}"), "--no-explain", *common)
    assert code == 0, err[-2000:]
    assert 0.8 <= _ratio(err) <= 1.2, err[-600:]
    recorded = json.loads((planned / f"s{batch}" / "scores.json").read_text())["memory_plan"]
    assert recorded["predicted_peak_bytes"] == sum(recorded["parts"].values()) and recorded["measured_peak_bytes"] > 0


def test_a_plan_over_the_budget_is_refused_before_any_weight_is_read(planned, capsys):
    from pretrace.cli import main

    code = main(["fit", "--model", str(planned / "model"), "--data", str(planned / "docs.jsonl"), "--out", str(planned / "refused"),
                 "--batch-size", "64", "--max-length", "128", "--memory-gb", "0.2", "--device", "cpu"])
    err = assert_refused(code, capsys, "exceeds the memory budget of 0.20 GB with --batch-size 64", "its largest part is")
    assert "Loading weights" not in err and not (planned / "refused").exists()


def test_batch_size_auto_takes_the_largest_batch_the_budget_fits(planned):
    from pretrace.curvature import Factors
    from pretrace.modeling.memory import BATCH_CHOICES, fit_plan, model_shapes
    from pretrace.modeling.stage import ModelOptions
    from pretrace.workflows.fit import fit

    options = ModelOptions(max_length=128, device="cpu")
    shapes = model_shapes(planned / "model", options)
    budget = (fit_plan(shapes, 16, 128, "float32").total + fit_plan(shapes, 32, 128, "float32").total) / 2  # 16 fits, 32 does not
    fit(str(planned / "model"), str(planned / "docs.jsonl"), planned / "auto", ModelOptions(max_length=128, device="cpu", batch_size="auto",
                                                                                             memory_gb=budget / 1e9), progress=False)
    recorded = Factors.load(planned / "auto").metadata
    assert recorded["options"]["batch_size"] == 16 and 16 in BATCH_CHOICES
    assert recorded["memory_plan"]["predicted_peak_bytes"] <= budget


def test_batch_size_takes_a_number_or_auto_only():
    from pretrace.errors import PretraceError
    from pretrace.modeling.stage import ModelOptions

    with pytest.raises(PretraceError, match="--batch-size 'big': pass a number of sequences, or 'auto'"):
        ModelOptions(batch_size="big")
    with pytest.raises(PretraceError, match="--batch-size"):
        ModelOptions(batch_size=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_score_like_float32_within_their_rounding(tmp_path, dtype):
    """Weights in half precision, sums, eigendecompositions and Λ in float32/float64: the scores equal the float32
    model's within what 8 (bfloat16) or 11 (float16) significant bits allow. Each score is a sum of products of
    values that went through the forward and backward pass of 2 layers, a few dozen roundings deep; with unit
    roundoff u (2^-8, 2^-11) the relative error stays below 32u (a random walk over those roundings), and the
    ranking of well-separated scores is kept."""
    import pretrace
    from tiny import build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer()
    model = build_tiny_model("gpt_neox", tokenizer, dtype=torch.float32)
    half = build_tiny_model("gpt_neox", tokenizer, dtype=getattr(torch, dtype))
    half.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()})
    model.load_state_dict({k: v.to(getattr(torch, dtype)).float() for k, v in model.state_dict().items()})  # the same weights, exactly
    queries = [{"prompt": "paris is the capital of", "completion": " france ."}, {"prompt": "birds can", "completion": " fly ."}]
    results = {}
    for name, m in (("float32", model), (dtype, half)):
        factors = pretrace.fit(m, list(SENTENCES), tokenizer=tokenizer, progress=False)
        assert all(mf.lambda_.dtype == torch.float32 for mf in factors.modules.values())
        results[name] = pretrace.score(queries, list(SENTENCES), model=m, factors=factors, tokenizer=tokenizer, explain=False, progress=False).scores
    unit = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    error = float((results[dtype] - results["float32"]).norm() / results["float32"].norm())
    assert error < 32 * unit
    for q in range(2):
        gaps = results["float32"][q].sort(descending=True).values.diff().abs()
        if float(gaps[0]) > 4 * 32 * unit * float(results["float32"][q].abs().max()):
            assert int(results[dtype][q].argmax()) == int(results["float32"][q].argmax())


def test_float16_overflow_is_caught_in_the_module_where_it_arises(tmp_path):
    import pretrace
    from pretrace.errors import PretraceError
    from tiny import build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer()
    model = build_tiny_model("gpt_neox", tokenizer, dtype=torch.float16)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight.mul_(1e6)  # its outputs, the next module's inputs, overflow
    with pytest.raises(PretraceError, match=r"module gpt_neox\.layers\.1\.mlp\.dense_4h_to_h: its inputs hold NaN or infinite values in torch.float16"):
        pretrace.fit(model, list(SENTENCES), tokenizer=tokenizer, progress=False)
