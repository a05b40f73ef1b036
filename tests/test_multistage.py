"""Multi-stage scores end to end against the formula built from dense EK-FAC matrices, and the refusals."""

import json

import pytest
import torch

from dense import autograd_document_gradients, damped, dense_curvature, hand_query_gradients, predicted_tokens_per_document
from pretrace.config import from_flags
from pretrace.curvature import Factors
from pretrace.data import Document
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.modeling.modules import select_modules
from pretrace.training.finetune import FinetuneSettings, finetune
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.fit import fit
from pretrace.workflows.score import ScoreSettings, score
from tiny import SENTENCES, save_tiny_model, write_jsonl

PAIRS = [("the capital of france is", " paris ."), ("the capital of germany is", " berlin ."), ("birds can", " fly ."), ("fish can", " swim .")]
QUERIES = [("rome is in", " italy ."), ("the cat sat on", " the mat .")]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("multistage")
    pretrained = save_tiny_model(root / "pt", "gpt_neox", dtype=torch.float64)
    docs = write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES)])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    write_jsonl(root / "queries.jsonl", [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(QUERIES)])
    finetuned = root / "ft"
    finetune(FinetuneSettings(model=str(pretrained), data=str(pairs), out=str(finetuned), alpha=0.05, lr=1e-2, epochs=5,
                              batch_size=2, dtype="float64", device="cpu", seed=0), progress=False)
    options = ModelOptions(dtype="float64", device="cpu", batch_size=3, attention_blocks="head")
    from pretrace.curvature import FitSettings

    fit(pretrained, docs, root / "f_pt", options, FitSettings(factor_dtype="float64", diagonal=True), progress=False)
    fit(finetuned, pairs, root / "f_ft", options, FitSettings(factor_dtype="float64", diagonal=True), progress=False)
    return root, options


def _settings(root, **kw):
    base = dict(queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=str(root / "scores"),
                pretrained=str(root / "pt"), finetuned=str(root / "ft"), pretrained_factors=str(root / "f_pt"),
                finetuned_factors=str(root / "f_ft"), overwrite=True, top_k=3)
    base.update(kw)
    return from_flags(ScoreSettings, **base)


@pytest.mark.parametrize("method,finetuned_damping", [("ekfac", None), ("kfac", None), ("diagonal", None), ("ekfac", 0.02)])
def test_multi_stage_scores_equal_dense_formula(stages, method, finetuned_damping):
    """α (H_ft + λ_ft I)⁻¹ (H_pt + λ_pt I)⁻¹ with λ_ft = α unless --finetuned-damping, for each curvature kind."""
    root, options = stages
    result = score(_settings(root, method=method, finetuned_damping=finetuned_damping), options)  # α comes from the fine-tuning record
    pt_model, ft_model = load_model(root / "pt", "float64"), load_model(root / "ft", "float64")
    tokenizer = load_tokenizer(root / "pt")
    pt_tracked = select_modules(pt_model, attention_blocks="head")
    ft_tracked = select_modules(ft_model, attention_blocks="head")
    alpha = 0.05
    pt, ft = Factors.load(root / "f_pt"), Factors.load(root / "f_ft")
    ft_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in PAIRS) / len(PAIRS)  # completion tokens only
    pt_blocks, pt_relative = dense_curvature(method, pt, pt_model, pt_tracked, predicted_tokens_per_document(tokenizer, SENTENCES))
    ft_blocks, _ = dense_curvature(method, ft, ft_model, ft_tracked, ft_tokens)
    h_pt = damped(pt_blocks, pt_relative)
    h_ft = damped(ft_blocks, [alpha if finetuned_damping is None else finetuned_damping] * len(ft_blocks))
    docs = [Document(f"d{i}", s) for i, s in enumerate(SENTENCES)]
    doc_grads = autograd_document_gradients(pt_model, pt_tracked, tokenizer, docs)
    q = hand_query_gradients(ft_model, ft_tracked, tokenizer, QUERIES)
    reference = alpha * q @ torch.linalg.solve(h_ft, torch.linalg.solve(h_pt, doc_grads.T))
    relative = (result.scores - reference).norm() / reference.norm()
    assert relative < 1e-10, float(relative)  # float64 end to end: eigenbasis rotations and dense solves differ at ~1e-14
    meta = json.loads((root / "scores" / "scores.json").read_text())
    assert meta["multi_stage"] and meta["hyperparameters"]["alpha"] == alpha


def test_finetuned_stage_covariance_uses_predicting_positions(stages):
    """The fine-tuned Fisher lives at the positions that predict answer tokens (the last prompt position first)."""
    root, _ = stages
    model = load_model(root / "ft", "float64")
    tokenizer = load_tokenizer(root / "ft")
    module = dict(model.named_modules())["gpt_neox.layers.1.mlp.dense_h_to_4h"]
    factors = Factors.load(root / "f_ft")
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.__setitem__("a", args[0].detach()))
    total, count = 0, 0
    for prompt, completion in PAIRS:
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_total = n_prompt + len(tokenizer(completion, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]])
        model(input_ids=ids)
        a = torch.cat([seen["a"][0], torch.ones(n_total, 1, dtype=torch.float64)], 1)[n_prompt - 1 : n_total - 1]
        total, count = total + a.T @ a, count + a.shape[0]
    handle.remove()
    torch.testing.assert_close(factors.modules["gpt_neox.layers.1.mlp.dense_h_to_4h"].activation_covariance, total / count)


def test_refuses_a_finetuned_model_of_another_base(stages, tmp_path):
    root, options = stages
    other = save_tiny_model(tmp_path / "other", "gpt_neox", seed=7, dtype=torch.float64)
    from pretrace.workflows.fit import fit
    from pretrace.curvature import FitSettings

    fit(other, root / "docs.jsonl", tmp_path / "f_other", options, FitSettings(factor_dtype="float64"), progress=False)
    settings = _settings(root, pretrained=str(other), pretrained_factors=str(tmp_path / "f_other"), out=str(tmp_path / "s"))
    with pytest.raises(PretraceError, match="different pre-trained model"):
        score(settings, options)
    assert not (tmp_path / "s").exists()
    forced = _settings(root, pretrained=str(other), pretrained_factors=str(tmp_path / "f_other"), out=str(tmp_path / "s"), force=True)
    assert score(forced, options).scores.shape == (2, len(SENTENCES))


def test_refuses_factors_of_the_other_stage(stages, tmp_path):
    root, options = stages
    swapped = _settings(root, pretrained_factors=str(root / "f_ft"), finetuned_factors=str(root / "f_pt"), out=str(tmp_path / "s"))
    with pytest.raises(PretraceError, match="different model"):
        score(swapped, options)


def test_needs_alpha_without_record(stages, tmp_path):
    root, options = stages
    import shutil

    bare = tmp_path / "ft_bare"
    shutil.copytree(root / "ft", bare)
    (bare / "pretrace_finetune.json").unlink()
    settings = _settings(root, finetuned=str(bare), out=str(tmp_path / "s"))
    with pytest.raises(PretraceError, match="alpha"):
        score(settings, options)
