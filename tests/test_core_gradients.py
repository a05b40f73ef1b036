"""Per-document gradients from captured activations equal autograd's, on every architecture."""

import pytest
import torch

from dense import autograd_document_gradients, computation_dtype, flatten, tolerance
from pretrace.data import Document
from pretrace.data.batching import collate, encode_documents, iter_batches
from pretrace.errors import PretraceError
from pretrace.gradients import LanguageModelingTask, capture
from pretrace.modeling.modules import ALL_PARAMETERS, TrackedModule, TrackedParameter, require_linear_modules, select_modules
from tiny import build_tiny_model

ARCHS = ["gpt_neox", "bloom", "gpt2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_example_gradients_equal_autograd(arch, padding_side, tokenizer, sentences):
    # transformers' BLOOM produces NaN for left-padded rows in float64, so that case runs in float32
    dtype = torch.float32 if (arch, padding_side) == ("bloom", "left") else torch.float64
    model = build_tiny_model(arch, tokenizer, dtype=dtype)
    tracked = select_modules(model)
    docs = [Document(str(i), s) for i, s in enumerate(sentences[:5])]
    reference = autograd_document_gradients(model, tracked, tokenizer, docs)
    batch = next(iter_batches(encode_documents(tokenizer, docs, 64), 5, tokenizer.pad_token_id, padding_side))
    task = LanguageModelingTask()
    captured = capture(model, tracked, lambda: task.document_loss(model, batch))
    ours = flatten({t.name: captured.example_gradients(t.name) for t in tracked}, tracked)
    assert ours.shape == reference.shape
    # a padded batch and a lone document round differently wherever the model computes below its own dtype
    precision = computation_dtype(model, lambda: task.document_loss(model, batch))
    torch.testing.assert_close(ours, reference, **tolerance(precision, reference))


def test_capture_leaves_requires_grad_and_grads_untouched(tokenizer, sentences):
    model = build_tiny_model("gpt_neox", tokenizer)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    tracked = select_modules(model, preset="mlp")
    batch = next(iter_batches(encode_documents(tokenizer, [Document("0", sentences[0])], 64), 1, 0))
    capture(model, tracked, lambda: LanguageModelingTask().document_loss(model, batch))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_presets_and_regex_select_expected_modules(tokenizer):
    model = build_tiny_model("gpt2", tokenizer)
    names = lambda **kw: [t.name for t in select_modules(model, **kw)]
    assert names(preset="mlp") == [f"transformer.h.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")]
    assert names(preset="attention") == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]
    assert names(regex=r"h\.1\.mlp\.c_fc") == ["transformer.h.1.mlp.c_fc"]
    everything = names()
    assert len(everything) == 8 and not any("wte" in n or "lm_head" in n for n in everything)


def _all_parameter_gradients(model, tokenizer, docs):
    """[N, P]: one backward pass per document over model.parameters() (a tied weight once), flattened."""
    task, rows = LanguageModelingTask(), []
    for encoded in encode_documents(tokenizer, docs, 64):
        model.zero_grad(set_to_none=True)
        task.document_loss(model, collate([encoded], pad_id=0)).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])  # GPT-2 ties its LM head to the embedding
def test_all_parameters_example_gradients_equal_autograd(arch, tokenizer, sentences):
    model = build_tiny_model(arch, tokenizer)
    tracked = select_modules(model, preset=ALL_PARAMETERS)
    assert sum(t.num_parameters for t in tracked) == sum(p.numel() for p in model.parameters())
    docs = [Document(str(i), s) for i, s in enumerate(sentences[:5])]
    batch = next(iter_batches(encode_documents(tokenizer, docs, 64), 5, tokenizer.pad_token_id, "left"))
    captured = capture(model, tracked, lambda: LanguageModelingTask().document_loss(model, batch))
    # our entries hold the same numbers as model.parameters(), in the model's order, a linear module's bias
    # as its last column: compare per parameter tensor
    ours = {}
    for t in tracked:
        for p, g in zip(t.parameters(), t.to_parameters(captured.example_gradients(t.name))):
            ours[id(p)] = g.flatten(1)
    reference = _all_parameter_gradients(model, tokenizer, docs)
    precision = computation_dtype(model, lambda: LanguageModelingTask().document_loss(model, batch))
    torch.testing.assert_close(torch.cat([ours[id(p)] for p in model.parameters()], dim=1), reference, **tolerance(precision, reference))
    for t in tracked:  # the factor form scoring contracts gives the same gradients
        factors = torch.einsum("bto,bti->boi", captured.output_gradients[t.name], captured.activations[t.name])
        torch.testing.assert_close(factors, captured.example_gradients(t.name), rtol=1e-12, atol=0)
    assert set(captured.parameter_gradients) == {t.name for t in tracked if isinstance(t, TrackedParameter)} != set()


def test_all_parameters_scope_counts_a_tied_weight_once_and_filters_by_regex(tokenizer):
    model = build_tiny_model("gpt2", tokenizer)
    assert model.lm_head.weight is model.transformer.wte.weight
    tracked = select_modules(model, preset=ALL_PARAMETERS)
    names = [t.name for t in tracked]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"] and not any("lm_head" in n for n in names)
    kinds = {t.name: type(t) for t in tracked}
    assert kinds["transformer.h.0.mlp.c_fc"] is TrackedModule and kinds["transformer.h.0.ln_1.bias"] is TrackedParameter
    assert [t.name for t in select_modules(model, preset=ALL_PARAMETERS, regex=r"ln_f|h\.1\.mlp\.c_proj")] == [
        "transformer.h.1.mlp.c_proj", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    neox = build_tiny_model("gpt_neox", tokenizer)  # untied: its LM head is a linear module of its own
    assert type({t.name: t for t in select_modules(neox, preset=ALL_PARAMETERS)}["lm_head"]) is TrackedModule
    with pytest.raises(PretraceError, match="--method ekfac needs Kronecker.*--preset all"):
        require_linear_modules(tracked, "--method ekfac")
    require_linear_modules(select_modules(model), "--method ekfac")
