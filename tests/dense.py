"""Slow, independent references: autograd loops and explicitly built dense matrices.

The reference path never calls pretrace's tokenization, batching or loss: each document is tokenized
with the tokenizer itself, run alone (no padding, no mask) and its next-token cross-entropy is written
out with an explicit shift, so a masking or off-by-one error in the library cannot cancel out here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def token_ids(tokenizer, text: str, max_length: int = 64) -> torch.Tensor:
    """[T] the document's tokens exactly as the tokenizer gives them, cut to max_length."""
    return torch.tensor(tokenizer(text)["input_ids"][:max_length], dtype=torch.long)


def hand_loss(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{t<T-1} -log softmax(logits[t])[label_t]: position t predicts token t+1 (labels default to ids[1:])."""
    labels = ids[1:] if labels is None else labels
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return -log_probs[torch.arange(len(labels)), labels].sum()


def tracked_parameters(tracked) -> list:
    """The tensors behind each tracked entry, weight then bias, read from the module itself."""
    params = []
    for t in tracked:
        module = getattr(t, "module", None)
        if module is None:
            params.append(t.parameter)
            continue
        params.append(module.weight)
        if module.bias is not None:
            params.append(module.bias)
    return params


def as_matrices(tracked, grads) -> list[torch.Tensor]:
    """[..., d_out, d_in(+1 bias column last)] per tracked entry from parameter gradients `grads` (leading batch dims kept)."""
    out, index = [], 0
    for t in tracked:
        module = getattr(t, "module", None)
        if module is None:
            g = grads[index]
            lead = g.shape[: g.dim() - t.parameter.dim()]
            out.append(g.reshape(*lead, t.d_out, t.d_in))
            index += 1
            continue
        w = grads[index]
        index += 1
        if not isinstance(module, nn.Linear):  # Hugging Face Conv1D stores [d_in, d_out]
            w = w.transpose(-1, -2)
        if module.bias is not None:
            w = torch.cat([w, grads[index][..., None]], dim=-1)
            index += 1
        out.append(w)
    return out


def _document_texts(documents):
    return [getattr(d, "text", d) for d in documents]


def autograd_document_gradients(model, tracked, tokenizer, documents, max_length=64):
    """Per document, one backward pass of its hand-written summed loss; gradients as flat [N, P] (tracked in order)."""
    params = tracked_parameters(tracked)
    rows = []
    for text in _document_texts(documents):
        ids = token_ids(tokenizer, text, max_length)
        loss = hand_loss(model(input_ids=ids[None]).logits[0], ids)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        rows.append(torch.cat([m.flatten() for m in as_matrices(tracked, grads)]).detach())
    return torch.stack(rows)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _LowestPrecision(TorchFunctionMode):
    """Records the least precise floating dtype of any tensor computed from a tensor that requires grad."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(t.requires_grad for t in _tensors((args, kwargs))):
            for t in _tensors(out):
                if t.is_floating_point() and torch.finfo(t.dtype).eps > torch.finfo(self.dtype).eps:
                    self.dtype = t.dtype
        return out


def computation_dtype(model, forward) -> torch.dtype:
    """The precision `forward()` really differentiates through: the model's dtype, unless some step on the
    gradient path runs lower (transformers' BLOOM softmax and Llama RMSNorm run in float32 in a float64 model)."""
    with _LowestPrecision(next(model.parameters()).dtype) as probe:
        forward()
    return probe.dtype


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> dict:
    """assert_close tolerances for two computations of `reference` that each round at `dtype`."""
    if dtype == torch.float64:  # measured differences ~1e-14 relative: margin for summation order only
        return {"rtol": 1e-8, "atol": 1e-10}
    # float32 rounds at 6e-8; a batch of different length reduces in a different order: 1e-4 of the entry
    # or of the largest entry, so tiny entries are not compared against an absolute floor bigger than they are
    return {"rtol": 1e-4, "atol": 1e-5 * float(reference.abs().max())}


def flatten(grads: dict, tracked) -> torch.Tensor:
    return torch.cat([grads[t.name].flatten(1) for t in tracked], dim=1)


def unflatten(flat: torch.Tensor, tracked) -> dict:
    out, offset = {}, 0
    for t in tracked:
        n = t.num_parameters
        out[t.name] = flat[:, offset : offset + n].reshape(-1, t.d_out, t.d_in_total)
        offset += n
    return out


def dense_eigenbasis_matrix(qa, qg, eigenvalues, damping):
    """Block-diagonal (over output blocks) (Q_G ⊗ Q_A) diag(eigenvalues + λ) (Q_G ⊗ Q_A)ᵀ for row-major vec(W)."""
    blocks = []
    for k in range(qg.shape[0]):
        kron = torch.kron(qg[k].double(), qa.double())
        blocks.append(kron @ torch.diag(eigenvalues[k].double().flatten() + damping) @ kron.T)
    return torch.block_diag(*blocks)


def dense_gauss_newton(model, tracked, tokenizer, documents, max_length=64):
    """Mean over documents of Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over tracked parameters, built from
    one gradient per (predicting position, vocabulary entry): exact, and only feasible for tiny models."""
    params = tracked_parameters(tracked)
    total = 0
    texts = _document_texts(documents)
    for text in texts:
        ids = token_ids(tokenizer, text, max_length)
        logits = model(input_ids=ids[None]).logits[0]
        probs = torch.softmax(logits.detach(), -1)
        vocab = logits.shape[-1]
        positions = range(len(ids) - 1)  # every position but the last predicts a token
        cotangents = torch.zeros(len(positions) * vocab, *logits.shape, dtype=logits.dtype)
        eye = torch.eye(vocab, dtype=logits.dtype)
        for i, t in enumerate(positions):
            cotangents[i * vocab : (i + 1) * vocab, t] = probs[t].sqrt()[:, None] * (eye - probs[t][None, :])
        grads = torch.autograd.grad(logits, params, cotangents, is_grads_batched=True)
        jac = torch.cat([m.flatten(1) for m in as_matrices(tracked, grads)], dim=1)
        total = total + jac.T @ jac
    return total / len(texts)


def head_rows(model, block_name: str, d_out: int) -> torch.Tensor:
    """Output rows a block named `head{h}.{q|k|v}` occupies, from each architecture's own layout (written
    here by hand, not taken from pretrace): GPT-NeoX/BLOOM fuse [head][q|k|v][head_dim], GPT-2 fuses
    [q|k|v][head][head_dim], Llama's separate projections are [head][head_dim] (k/v with the kv-head count)."""
    if block_name == "all":
        return torch.arange(d_out)
    head, role = block_name.split(".")
    h, r = int(head.removeprefix("head")), "qkv".index(role)
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = config.hidden_size // heads
    if config.model_type in ("gpt_neox", "bloom"):
        start = h * 3 * head_dim + r * head_dim
    elif config.model_type == "gpt2":
        start = r * config.hidden_size + h * head_dim
    else:
        start = h * head_dim
    return torch.arange(start, start + head_dim)


def hand_statistics(model, tracked, tokenizer, texts, labels=None, max_length=64):
    """Per tracked module, from one document at a time with plain hooks and the hand-written loss:
    A = mean over predicting tokens of [x;1][x;1]ᵀ, G per block = mean of g_b g_bᵀ (g = ∂loss/∂output,
    rows from `head_rows`), and the per-document gradients [N, d_out, d_in']. `labels[i]` replaces
    document i's next tokens (sampled labels of the true Fisher). Returns (stats, predicted tokens)."""
    seen = {}
    handles = [t.module.register_forward_hook(lambda m, args, out, n=t.name: seen.__setitem__(n, (args[0], out))) for t in tracked]
    params = tracked_parameters(tracked)
    stats = {t.name: {"A": 0, "G": [0] * t.n_blocks, "grads": []} for t in tracked}
    tokens = 0
    try:
        for i, text in enumerate(texts):
            ids = token_ids(tokenizer, text, max_length)
            seen.clear()
            loss = hand_loss(model(input_ids=ids[None]).logits[0], ids, None if labels is None else labels[i])
            outputs = [seen[t.name][1] for t in tracked]
            grads = torch.autograd.grad(loss, params + outputs)
            matrices = as_matrices(tracked, grads[: len(params)])
            predicting = len(ids) - 1  # the last position predicts nothing
            tokens += predicting
            for t, g, grad in zip(tracked, grads[len(params):], matrices):
                x = seen[t.name][0][0, :predicting].detach()
                a = torch.cat([x, torch.ones(predicting, 1, dtype=x.dtype)], 1) if t.module.bias is not None else x
                g = g[0, :predicting].detach()
                s = stats[t.name]
                s["A"] = s["A"] + a.T @ a
                for k, block in enumerate(t.block_names):
                    gb = g[:, head_rows(model, block, t.d_out)]
                    s["G"][k] = s["G"][k] + gb.T @ gb
                s["grads"].append(grad.detach())
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        s["A"] = s["A"] / tokens
        s["G"] = torch.stack(s["G"]) / tokens
        s["grads"] = torch.stack(s["grads"])
    return stats, tokens


def hand_query_gradients(model, tracked, tokenizer, pairs, max_length=64):
    """[Q, P] gradients of each (prompt, completion)'s summed completion loss: prompt and completion tokenized
    apart and joined, and only the positions predicting completion tokens counted (from prompt length - 1)."""
    params = tracked_parameters(tracked)
    rows = []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor((prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"])[:max_length])
        logits = model(input_ids=ids[None]).logits[0]
        start = len(prompt_ids) - 1  # the last prompt position predicts the first completion token
        log_probs = torch.log_softmax(logits[start:-1], dim=-1)
        loss = -log_probs[torch.arange(len(ids) - 1 - start), ids[start + 1 :]].sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        rows.append(torch.cat([m.flatten() for m in as_matrices(tracked, grads)]).detach())
    return torch.stack(rows)


def place_blocks(model, t, blocks) -> torch.Tensor:
    """A module's dense [P, P] curvature in the row-major vec of its [d_out, d_in'] gradient from one
    [block·d_in', block·d_in'] matrix per output block, each at the rows `head_rows` says it occupies."""
    n = t.d_out * t.d_in_total
    dense = torch.zeros(n, n, dtype=torch.float64)
    for block, matrix in zip(t.block_names, blocks):
        rows = head_rows(model, block, t.d_out)
        idx = (rows[:, None] * t.d_in_total + torch.arange(t.d_in_total)[None]).flatten()
        dense[idx[:, None], idx[None, :]] = matrix.double()
    return dense


def dense_curvature(kind: str, factors, model, tracked, tokens_per_document: float):
    """Per module, its dense undamped curvature from stored factors and its default damping (0.1 × mean eigenvalue,
    taken as trace / size of that matrix): EK-FAC from Q_A, Q_G and Λ; K-FAC as tokens per document × G ⊗ A from
    the covariances themselves (tokens counted by the caller, from the tokenizer); the diagonal as stored."""
    blocks, dampings = [], []
    for t in tracked:
        mf = factors.modules[t.name]
        if kind == "ekfac":
            dense = dense_eigenbasis_matrix(mf.activation_eigenvectors, mf.gradient_eigenvectors, mf.lambda_, 0.0)
        elif kind == "kfac":
            dense = place_blocks(model, t, [tokens_per_document * torch.kron(g.double(), mf.activation_covariance.double()) for g in mf.gradient_covariance])
        elif kind == "diagonal":
            dense = torch.diag(mf.diagonal.flatten().double())
        else:
            raise ValueError(kind)
        blocks.append(dense)
        dampings.append(0.1 * float(dense.trace()) / len(dense))
    return blocks, dampings


def damped(blocks, dampings) -> torch.Tensor:
    """The block-diagonal matrix of the modules' curvatures, each plus its damping times the identity."""
    return torch.block_diag(*[b + d * torch.eye(len(b), dtype=b.dtype) for b, d in zip(blocks, dampings)])


def predicted_tokens_per_document(tokenizer, texts, max_length: int = 64) -> float:
    """Mean over documents of the positions that predict a token (all but the last), counted from the tokenizer."""
    texts = _document_texts(texts)
    return sum(len(token_ids(tokenizer, t, max_length)) - 1 for t in texts) / len(texts)
