"""PEFT adapter folders as models: merged (the default) equals the merged model saved as a folder, for fitting,
single-stage and multi-stage scoring; unmerged, only the adapter's own matrices are tracked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrace.cli import main
from pretrace.modeling.adapters import ADAPTER_PARAMETERS, is_adapter_folder
from tiny import SENTENCES, save_tiny_model, write_jsonl

COMMON = ["--device", "cpu", "--dtype", "float64", "--max-length", "32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from pretrace.modeling.loading import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("adapters")
    save_tiny_model(root / "base", "gpt_neox", dtype=torch.float64)
    base = load_model(root / "base", "float64")
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so the adapter really changes the weights
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value", "dense_h_to_4h"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "base")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    hub_named = root / "adapter-hub-base"  # as saved by someone who fine-tuned from a hub name
    peft_model.save_pretrained(hub_named)
    config["base_model_name_or_path"] = "EleutherAI/not-downloaded-here"
    (hub_named / "adapter_config.json").write_text(json.dumps(config))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    load_tokenizer(root / "base").save_pretrained(root / "merged")
    write_jsonl(root / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"prompt": "paris is the capital of", "completion": " france ."},
                                   {"prompt": "the cat sat", "completion": " on the mat ."}])
    return root


def _scores(folder):
    return load_file(str(folder / "scores.safetensors"))["scores"]


def test_an_adapter_is_its_merged_model_for_fit_and_scores(folders):
    root = folders
    assert is_adapter_folder(root / "adapter") and not is_adapter_folder(root / "merged")
    for name in ("adapter", "merged"):
        assert main(["fit", "--model", str(root / name), "--data", str(root / "train.jsonl"), "--out", str(root / f"f-{name}"), *COMMON]) == 0
        assert main(["score", "--model", str(root / name), "--factors", str(root / f"f-{name}"), "--queries", str(root / "q.jsonl"),
                     "--train", str(root / "train.jsonl"), "--out", str(root / f"s-{name}"), *COMMON]) == 0
    for key, value in load_file(str(root / "f-merged" / "factors.safetensors")).items():
        assert torch.equal(load_file(str(root / "f-adapter" / "factors.safetensors"))[key], value), key
    assert torch.equal(_scores(root / "s-adapter"), _scores(root / "s-merged"))
    merged_moved = load_file(str(root / "merged" / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    assert any(not torch.equal(merged_moved[k], base[k]) for k in base)  # the adapter changed the weights


def test_a_finetuned_adapter_takes_its_base_from_pretrained_when_its_recorded_one_is_not_local(folders):
    root = folders
    assert main(["fit", "--model", str(root / "base"), "--data", str(root / "train.jsonl"), "--out", str(root / "f-base"), *COMMON]) == 0
    runs = {}
    for name in ("adapter-hub-base", "merged"):
        out = root / f"ms-{name}"
        assert main(["score", "--pretrained", str(root / "base"), "--finetuned", str(root / name), "--pretrained-factors", str(root / "f-base"),
                     "--finetuned-factors", str(root / "f-merged"), "--alpha", "0.1", "--queries", str(root / "q.jsonl"),
                     "--train", str(root / "train.jsonl"), "--out", str(out), *COMMON]) == 0
        runs[name] = _scores(out)
    assert torch.equal(runs["adapter-hub-base"], runs["merged"])


def test_an_adapter_whose_base_cannot_be_found_is_refused(folders, capsys):
    root = folders
    assert main(["fit", "--model", str(root / "adapter-hub-base"), "--data", str(root / "train.jsonl"), "--out", str(root / "nope"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "'EleutherAI/not-downloaded-here' is not a local model folder" in err and "--pretrained" in err and "Traceback" not in err
    assert not (root / "nope").exists()


def test_unmerged_the_adapter_matrices_alone_are_tracked_and_their_gradients_are_autograds(folders):
    from pretrace.data import Document
    from pretrace.modeling.stage import ModelOptions, load_stage

    root = folders
    stage = load_stage(root / "adapter", ModelOptions(device="cpu", dtype="float64", max_length=32, adapter=ADAPTER_PARAMETERS))
    names = [t.name for t in stage.tracked]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names) and len(names) == 2 * 2 * 2  # 2 layers x 2 modules x A, B
    lora = {n: p for n, p in stage.model.named_parameters() if p.requires_grad}
    assert sum(t.num_parameters for t in stage.tracked) == sum(p.numel() for p in lora.values())
    from pretrace.gradients import LanguageModelingTask, capture

    docs = [Document(str(i), s) for i, s in enumerate(SENTENCES[:3])]
    batch = next(stage.document_batches(docs)())
    captured = capture(stage.model, stage.tracked, lambda: LanguageModelingTask().document_loss(stage.model, batch))
    for row, doc in enumerate(docs):  # one backward pass per document over the LoRA parameters: the reference
        single = next(stage.document_batches([doc])())
        stage.model.zero_grad(set_to_none=True)
        LanguageModelingTask().document_loss(stage.model, single).sum().backward()
        for t in stage.tracked:
            torch.testing.assert_close(captured.example_gradients(t.name)[row], t.weight_gradient(), rtol=1e-8, atol=1e-12)


def test_a_hub_model_name_offline_is_refused_with_how_to_pass_a_folder(folders, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = folders
    assert main(["fit", "--model", "EleutherAI/not-in-any-cache", "--data", str(root / "train.jsonl"), "--out", str(root / "hub"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "the hub model 'EleutherAI/not-in-any-cache' could not be fetched" in err and "--local-dir FOLDER" in err and "Traceback" not in err
    assert not (root / "hub").exists()
