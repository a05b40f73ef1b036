"""Ground truth for multi-stage influence by actually retraining both stages.

A small problem whose two stages can be solved to numerical convergence: only the tracked linear
modules are trained (everything else frozen), pre-training minimises the mean document loss plus
w/2‖θ‖² (so H_pt is well defined and EK-FAC's damping for it is exactly w), and fine-tuning minimises
the mean completion loss plus α/2‖θ − θ_pt‖² (so H_ft's damping is exactly α). With a few hundred
parameters the exact Hessian is cheap, so both stages are solved by L-BFGS then Newton's method in
float64; a retrain after removing one document starts from the base solution, where Newton converges in
2-4 steps. Removing document i and re-solving both stages measures the true change of a query's loss
that the influence formula predicts to first order: Δm ≈ score / N.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm import tqdm

from pretrace.data.batching import TokenBatch, collate, encode_documents, encode_queries
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.gradients.task import LanguageModelingTask
from pretrace.modeling.modules import TrackedModule


@dataclass
class ProximalProblem:
    model: torch.nn.Module
    tracked: list[TrackedModule]
    documents: TokenBatch
    pairs: TokenBatch
    queries: TokenBatch
    weight_decay: float
    alpha: float

    @classmethod
    def build(cls, model, tracked, tokenizer, documents: list[Document], pairs: list[Query], queries: list[Query], weight_decay: float, alpha: float, pad_id: int = 0):
        batch = lambda items: collate(list(items), pad_id)
        return cls(model, tracked, batch(encode_documents(tokenizer, documents, 512)), batch(encode_queries(tokenizer, pairs, 512)),
                   batch(encode_queries(tokenizer, queries, 512)), weight_decay, alpha)

    # -- parameters as one flat vector -------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        names = []
        for t in self.tracked:
            names.append(f"{t.name}.weight")
            if t.has_bias:
                names.append(f"{t.name}.bias")
        return names

    def flat(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().flatten() for n in self.parameter_names()])

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out, offset = {}, 0
        for name in self.parameter_names():
            n = params[name].numel()
            out[name] = theta[offset : offset + n].view_as(params[name])
            offset += n
        return out

    def load(self, theta: torch.Tensor) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._unflatten(theta).items():
                params[name].copy_(value)

    # -- objectives ----------------------------------------------------------------------------------
    def losses(self, theta: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """[B] summed target-token losses at parameters theta (other weights as in the model)."""
        wrapper = _Functional(self.model, self._unflatten(theta))
        return LanguageModelingTask().document_loss(wrapper, batch)

    def pretrain_objective(self, theta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        losses = self.losses(theta, self.documents)
        weights = torch.ones_like(losses) if weights is None else weights
        return (weights * losses).sum() / len(losses) + 0.5 * self.weight_decay * theta.square().sum()

    def finetune_objective(self, theta: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return self.losses(theta, self.pairs).mean() + 0.5 * self.alpha * (theta - theta_pt).square().sum()

    def example_gradients(self, theta: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """[B, P] gradient of each sequence's summed loss (autograd, independent of pretrace's capture)."""
        theta = theta.detach()
        return torch.stack([torch.func.grad(lambda th: self.losses(th, batch)[i])(theta) for i in range(len(batch))])

    # -- solving -------------------------------------------------------------------------------------
    def solve_pretraining(self, start: torch.Tensor) -> torch.Tensor:
        return newton_minimise(self.pretrain_objective, quasi_newton(self.pretrain_objective, start))

    def solve_finetuning(self, start: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        objective = lambda th: self.finetune_objective(th, theta_pt)
        return newton_minimise(objective, quasi_newton(objective, start))

    def removal_effects(self, theta_pt: torch.Tensor, theta_ft: torch.Tensor, indices: list[int], progress: bool = True) -> torch.Tensor:
        """[n_indices, Q]: change of each query's loss when document i is removed and both stages re-solved."""
        base = self.losses(theta_ft, self.queries).detach()
        effects = []
        for i in tqdm(indices, desc="retraining", unit="document", disable=not progress):
            weights = torch.ones(len(self.documents), dtype=theta_pt.dtype)
            weights[i] = 0.0
            new_pt = newton_minimise(lambda th: self.pretrain_objective(th, weights), theta_pt)
            new_ft = newton_minimise(lambda th: self.finetune_objective(th, new_pt), theta_ft + (new_pt - theta_pt))
            effects.append(self.losses(new_ft, self.queries).detach() - base)
        return torch.stack(effects)


class _Functional(torch.nn.Module):
    """Calls the model with some parameters replaced (differentiably) by given tensors."""

    def __init__(self, model: torch.nn.Module, parameters: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.parameters_override = model, parameters

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.parameters_override, args, kwargs, strict=False)


def hessian(objective, theta: torch.Tensor) -> torch.Tensor:
    """Dense exact Hessian [P, P] of a scalar objective (vectorised reverse-over-reverse autograd)."""
    matrix = torch.autograd.functional.hessian(objective, theta.detach(), vectorize=True)
    return 0.5 * (matrix + matrix.T)


def _value_and_gradient(objective, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Objective and gradient; an overflowing trial point (a too-long step) reads as +inf, never an error."""
    theta = theta.detach().requires_grad_(True)
    try:
        value = objective(theta)
    except PretraceError:
        return float("inf"), torch.full_like(theta, float("inf"))
    return float(value.detach()), torch.autograd.grad(value, theta)[0]


def newton_minimise(objective, start: torch.Tensor, tolerance: float = 1e-9, max_steps: int = 200) -> torch.Tensor:
    """Levenberg-damped Newton with the exact Hessian until ‖∇‖ < tolerance (quadratic near the optimum).

    Far from the optimum the Hessian of a network's loss can be indefinite: the damping μ grows until
    H + μI is positive definite and the step lowers the objective, and shrinks again after each success.
    """
    theta = start.detach().clone()
    value, grad = _value_and_gradient(objective, theta)
    mu = 0.0
    for _ in range(max_steps):
        if grad.norm() < tolerance:
            return theta
        curvature = hessian(objective, theta)
        eye = torch.eye(len(theta), dtype=theta.dtype)
        while True:
            factor, info = torch.linalg.cholesky_ex(curvature + mu * eye)
            if info == 0:
                candidate = theta - torch.cholesky_solve(grad.unsqueeze(1), factor).squeeze(1)
                new_value, new_grad = _value_and_gradient(objective, candidate)
                if new_value <= value or new_grad.norm() < grad.norm():  # values stop resolving near the optimum
                    theta, value, grad = candidate, new_value, new_grad
                    mu = mu / 10 if mu > 1e-12 else 0.0
                    break
            mu = max(10 * mu, 1e-6)
            if mu > 1e12:
                raise PretraceError("Newton's method cannot lower the objective; the problem is badly scaled (raise the weight decay).")
    raise PretraceError(f"Newton's method did not reach gradient norm {tolerance:g} in {max_steps} steps (last {float(grad.norm()):.3g}).")


def quasi_newton(objective, start: torch.Tensor, tolerance: float = 1e-5) -> torch.Tensor:
    """L-BFGS (cheap gradient steps) until Newton's quadratic convergence can take over."""
    theta = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=2000, tolerance_grad=tolerance, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimizer.step(closure)
    return theta.detach()


# -- a synthetic two-stage problem and the comparison of influence variants against retraining --------

_COUNTRIES = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"), ("egypt", "cairo"),
              ("peru", "lima"), ("kenya", "nairobi"), ("chile", "santiago"), ("cuba", "havana"), ("india", "delhi"), ("china", "beijing")]
_FILLERS = ["the cat sat on the mat", "a dog ran in the park", "birds can fly", "fish can swim", "the sun is hot", "the moon is cold"]


@dataclass
class RetrainingSettings:
    documents: int = 60
    hidden_size: int = 8
    weight_decay: float = 1e-2
    alpha: float = 1e-1
    # "broad": the fine-tuning set mixes capital questions with sentence completions and city → country pairs, as
    # an instruction-tuning set mixes tasks; "capitals": six capital questions only, whose nearly rank-deficient
    # H_ft makes α(H_ft + αI)⁻¹ a projector that EK-FAC's Kronecker eigenbasis cannot place (see the benchmark).
    finetuning: str = "broad"
    label_repeats: int = 16  # each document's labels are sampled this many times when fitting EK-FAC (true Fisher)
    fisher: str = "true"
    warmup_steps: int = 300
    seed: int = 0


def country_corpus(count: int, seed: int, finetuning: str = "broad") -> tuple[list[Document], list[Query], list[Query]]:
    """Facts about 12 capitals padded with filler sentences; fine-tune on 6 capitals (and, if broad, other
    completions), query the other 6 capitals."""
    rng = random.Random(seed)
    texts = []
    for country, capital in _COUNTRIES:
        texts += [f"{capital} is the capital of {country} .", f"the capital of {country} is {capital} .", f"{capital} is a city in {country} ."]
    if count < len(texts):
        raise PretraceError(f"the country corpus needs at least {len(texts)} documents, got {count}.")
    texts += [rng.choice(_FILLERS) + " ." for _ in range(count - len(texts))]
    documents = [Document(str(i), text) for i, text in enumerate(texts)]
    ask = lambda prefix, pairs: [Query(f"{prefix}{i}", f"what is the capital of {c} ?", f" {cap} .") for i, (c, cap) in enumerate(pairs)]
    pairs = ask("pair", _COUNTRIES[:6])
    if finetuning == "broad":
        for i, filler in enumerate(_FILLERS):
            words = filler.split()
            pairs.append(Query(f"complete{i}", " ".join(words[:2]), " " + " ".join(words[2:]) + " ."))
        pairs += [Query(f"city{i}", f"{capital} is a city in", f" {country} .") for i, (country, capital) in enumerate(_COUNTRIES[:6])]
    elif finetuning != "capitals":
        raise PretraceError(f"finetuning must be 'broad' or 'capitals', got {finetuning!r}.")
    return documents, pairs, ask("query", _COUNTRIES[6:])


def word_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_problem(settings: RetrainingSettings):
    """(problem, tokenizer, documents, pairs, queries): a 1-layer GPT-NeoX whose MLP is the trained part."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from pretrace.modeling.modules import select_modules

    documents, pairs, queries = country_corpus(settings.documents, settings.seed, settings.finetuning)
    tokenizer = word_tokenizer([d.text for d in documents] + [q.prompt + q.completion for q in pairs + queries])
    torch.manual_seed(settings.seed)
    h = settings.hidden_size
    config = GPTNeoXConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=h, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=2 * h, rotary_pct=0.5, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    problem = ProximalProblem.build(model, select_modules(model, preset="mlp"), tokenizer, documents, pairs, queries,
                                    settings.weight_decay, settings.alpha)
    # The frozen rest of the network gets sensible weights from a short unregularised warm-up on the documents.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(settings.warmup_steps):
        optimizer.zero_grad()
        LanguageModelingTask().document_loss(model, problem.documents).mean().backward()
        optimizer.step()
    return problem, tokenizer, documents, pairs, queries


def compare_influences(settings: RetrainingSettings, progress: bool = True) -> dict:
    """Retrain after removing each document; return the actual Δ query loss and each method's prediction [N, Q]."""
    from pretrace.curvature import EKFAC, Chain, FitSettings, Identity, Scaled, fit_factors
    from pretrace.data.batching import iter_batches
    from pretrace.scores import query_gradients, score_documents

    problem, tokenizer, documents, pairs, queries = build_problem(settings)
    theta_pt = problem.solve_pretraining(problem.flat())
    theta_ft = problem.solve_finetuning(theta_pt, theta_pt)
    n, w, alpha = len(documents), settings.weight_decay, settings.alpha
    actual = problem.removal_effects(theta_pt, theta_ft, list(range(n)), progress=progress)

    h_pt = hessian(problem.pretrain_objective, theta_pt)
    h_ft = hessian(lambda th: problem.losses(th, problem.pairs).mean(), theta_ft)
    query_grads = problem.example_gradients(theta_ft, problem.queries)
    doc_grads = problem.example_gradients(theta_pt, problem.documents)
    eye = torch.eye(len(theta_pt), dtype=theta_pt.dtype)
    scores = {"exact multi-stage": alpha * query_grads @ torch.linalg.solve(h_ft + alpha * eye, torch.linalg.solve(h_pt, doc_grads.T))}

    model, tracked = problem.model, problem.tracked
    fit = FitSettings(fisher=settings.fisher, seed=settings.seed, factor_dtype="float64")
    repeats = settings.label_repeats if settings.fisher == "true" else 1
    doc_batches = lambda: iter_batches(encode_documents(tokenizer, documents, 512), 64, 0)

    def factors(theta, encode, records):
        problem.load(theta)
        return fit_factors(model, tracked, lambda: iter_batches(encode(tokenizer, records * repeats, 512), 64, 0), fit, progress=False)

    def query_grads_at(theta):
        problem.load(theta)
        return query_gradients(model, tracked, iter_batches(encode_queries(tokenizer, queries, 512), 64, 0))

    def score(preconditioner, query, theta_docs):
        ids, grads = query
        problem.load(theta_docs)
        return score_documents(model, tracked, preconditioner.apply(grads), doc_batches(), ids).scores

    pt_factors = factors(theta_pt, encode_documents, documents)
    ft_factors = factors(theta_ft, encode_queries, pairs)
    ft_doc_factors = factors(theta_ft, encode_documents, documents)
    at_ft, at_pt = query_grads_at(theta_ft), query_grads_at(theta_pt)
    scores["EK-FAC multi-stage"] = score(Scaled(Chain([EKFAC(ft_factors, damping=alpha), EKFAC(pt_factors, damping=w)]), alpha), at_ft, theta_pt)
    scores["EK-FAC fine-tuned only"] = score(EKFAC(ft_doc_factors, damping=w), at_ft, theta_ft)
    scores["EK-FAC pre-trained only"] = score(EKFAC(pt_factors, damping=w), at_pt, theta_pt)
    scores["gradient dot product"] = score(Identity(), at_ft, theta_pt)
    return {"actual": actual, "predicted": {name: s.detach().T / n for name, s in scores.items()}}


def correlations(actual: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """Pearson over all (document, query) pairs, and the mean over queries of per-query Pearson/Spearman."""
    from pretrace.metrics import pearson, spearman

    columns = range(actual.shape[1])
    return {
        "pearson_pooled": float(pearson(predicted.flatten(), actual.flatten())),
        "pearson_per_query": sum(float(pearson(predicted[:, q], actual[:, q])) for q in columns) / actual.shape[1],
        "spearman_per_query": sum(float(spearman(predicted[:, q], actual[:, q])) for q in columns) / actual.shape[1],
    }
