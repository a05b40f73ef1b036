"""Slow, independent references: autograd loops and explicitly built dense matrices."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from pretrace.data.batching import collate, encode_documents
from pretrace.gradients.task import LanguageModelingTask


def autograd_document_gradients(model, tracked, tokenizer, documents, max_length=64):
    """Per document, one backward pass of its summed loss; gradients as flat [N, P] (tracked modules in order)."""
    task = LanguageModelingTask()
    rows = []
    for encoded in encode_documents(tokenizer, documents, max_length):
        batch = collate([encoded], pad_id=0)
        model.zero_grad(set_to_none=True)
        task.document_loss(model, batch).sum().backward()
        rows.append(torch.cat([t.weight_gradient().flatten() for t in tracked]).detach().clone())
    model.zero_grad(set_to_none=True)
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
    one gradient per (position, vocabulary entry): exact, and only feasible for tiny models."""
    params = []
    for t in tracked:
        params.append(t.module.weight)
        if t.has_bias:
            params.append(t.module.bias)
    total = 0
    count = 0
    for encoded in encode_documents(tokenizer, documents, max_length):
        batch = collate([encoded], pad_id=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0]
        positions = torch.nonzero(batch.predict_mask[0]).flatten()
        probs = torch.softmax(logits.detach(), -1)
        vocab = logits.shape[-1]
        cotangents = torch.zeros(len(positions) * vocab, *logits.shape, dtype=logits.dtype)
        for i, t in enumerate(positions):
            eye = torch.eye(vocab, dtype=logits.dtype)
            cotangents[i * vocab : (i + 1) * vocab, t] = probs[t].sqrt()[:, None] * (eye - probs[t][None, :])
        grads = torch.autograd.grad(logits, params, cotangents, is_grads_batched=True)
        rows = []
        index = 0
        for t in tracked:
            w = grads[index].flatten(2) if not t.transposed else grads[index].transpose(1, 2)
            index += 1
            w = w.reshape(w.shape[0], t.d_out, t.d_in)
            if t.has_bias:
                w = torch.cat([w, grads[index][:, :, None]], dim=2)
                index += 1
            rows.append(w.flatten(1))
        jac = torch.cat(rows, dim=1)
        total = total + jac.T @ jac
        count += 1
    return total / count
