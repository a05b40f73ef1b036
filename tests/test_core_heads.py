"""Per-head blocks name the slices the attention really uses as that head's query, key or value."""

import pytest
import torch

from pretrace.data import Document
from pretrace.data.batching import encode_documents, iter_batches
from pretrace.modeling.modules import select_modules
from tiny import build_tiny_model


def _spy_attention(model):
    """Swap the attention kernel for one that records (query, key, value) per layer, then calls SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        records.append((query.detach(), key.detach(), value.detach()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("pretrace_spy", spy)
    model.set_attn_implementation("pretrace_spy")
    return records


def _fused_outputs(model, modules, batch):
    outputs = {}
    handles = [t.module.register_forward_hook(lambda m, a, o, n=t.name: outputs.__setitem__(n, o.detach())) for t in modules]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "llama", "bloom"])
def test_head_blocks_match_each_heads_own_slice(arch, tokenizer, sentences):
    model = build_tiny_model(arch, tokenizer)
    batch = next(iter_batches(encode_documents(tokenizer, [Document("0", sentences[2])], 64), 1, 0))
    tracked = [t for t in select_modules(model, preset="attention", attention_blocks="head") if t.n_blocks > 1]
    if arch == "bloom":  # BLOOM has no pluggable attention kernel: use the model's own split of the fused output
        outputs = _fused_outputs(model, tracked, batch)
        layers = [model.transformer.h[i].self_attention._reshape(outputs[t.name]) for i, t in enumerate(tracked)]
        per_layer = {t.name: layers[i] for i, t in enumerate(tracked)}
    else:
        records = _spy_attention(model)
        outputs = _fused_outputs(model, tracked, batch)
        by_layer = {}
        for t in tracked:
            by_layer.setdefault(t.name.split(".attn")[0].split(".self_attn")[0].split(".attention")[0], []).append(t)
        per_layer = {}
        for (layer, modules), qkv in zip(by_layer.items(), records):
            if len(modules) == 1:
                per_layer[modules[0].name] = qkv
            else:  # separate q/k/v projections: each block belongs to the module's own role
                for t in modules:
                    per_layer[t.name] = qkv
    checked = 0
    for t in tracked:
        q, k, v = per_layer[t.name]
        roles = {"q": q, "k": k, "v": v}
        fused = outputs[t.name][0, 0]  # position 0: rotary embeddings are the identity there
        for index, block in enumerate(t.block_names):
            head, role = block.split(".")
            h = int(head.removeprefix("head"))
            expected = roles[role][0, h, 0]
            torch.testing.assert_close(fused[index * t.block_size : (index + 1) * t.block_size], expected)
            checked += 1
    expected_blocks = {"gpt_neox": 2 * 6, "gpt2": 2 * 6, "bloom": 2 * 6, "llama": 2 * (4 + 2 + 2)}[arch]
    assert checked == expected_blocks


def test_layer_mode_keeps_one_block(tokenizer):
    model = build_tiny_model("gpt_neox", tokenizer)
    assert all(t.n_blocks == 1 for t in select_modules(model, attention_blocks="layer"))
