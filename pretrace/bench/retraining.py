"""Ground truth for multi-stage influence by actually retraining both stages.

The trained part is the LM head of a small GPT-NeoX whose transformer (warmed up on the documents, then
frozen) supplies fixed features: each stage is then a softmax regression, strictly convex, so its optimum
is unique and Newton's method with the exact Hessian reaches it to ‖∇‖ < 1e-9 in a few steps, and
removing one document moves the optimum little enough that first-order influence is accurate. It is
also a setting EK-FAC is built for: the head is one linear layer with many predicted tokens per
document, and for it the true Fisher equals the Gauss-Newton matrix equals the Hessian, so EK-FAC's only
approximation is its Kronecker eigenbasis.

Pre-training minimises the mean document loss plus w/2‖θ‖² (H_pt's damping is exactly w); fine-tuning
minimises the mean completion loss plus α/2‖θ − θ_pt‖² (H_ft's damping is exactly α). Removing document
i and re-solving both stages measures the change of a query's loss that multi-stage influence predicts
to first order: Δm ≈ score / N.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from pretrace.data.batching import TokenBatch, collate, encode_documents, encode_queries
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.gradients.task import LanguageModelingTask, model_inputs
from pretrace.progress import progress_bar


@dataclass
class SequenceFeatures:
    """The frozen network's features at every predicting position of a set of sequences."""

    inputs: torch.Tensor  # [T, d_in] the LM head's input
    targets: torch.Tensor  # [T] the token predicted
    sequence: torch.Tensor  # [T] which sequence the position belongs to
    count: int  # number of sequences

    @classmethod
    def of(cls, model: torch.nn.Module, batch: TokenBatch) -> "SequenceFeatures":
        with torch.no_grad():
            hidden = model.base_model(**model_inputs(model, batch)).last_hidden_state
        mask = batch.predict_mask
        rows = torch.arange(len(batch)).unsqueeze(1).expand_as(mask)
        return cls(hidden[mask], batch.next_tokens[mask], rows[mask], len(batch))


@dataclass
class HeadProblem:
    """Both training stages of the LM head θ (flattened `[vocabulary, d_in]` weight) on fixed features."""

    model: torch.nn.Module
    documents: SequenceFeatures
    pairs: SequenceFeatures
    queries: SequenceFeatures
    weight_decay: float
    alpha: float

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    def flat(self) -> torch.Tensor:
        return self.head.weight.detach().flatten().clone()

    def load(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            self.head.weight.copy_(theta.view_as(self.head.weight))

    def _logits(self, theta: torch.Tensor, part: SequenceFeatures) -> torch.Tensor:
        return part.inputs @ theta.view_as(self.head.weight).T

    def _probabilities(self, theta: torch.Tensor, part: SequenceFeatures) -> torch.Tensor:
        return torch.softmax(self._logits(theta, part), dim=-1)

    # -- losses and their derivatives, in closed form -------------------------------------------------
    def losses(self, theta: torch.Tensor, part: SequenceFeatures) -> torch.Tensor:
        """[count] summed target-token cross-entropy of each sequence."""
        logits = self._logits(theta, part)
        tokens = torch.logsumexp(logits, -1) - logits.gather(1, part.targets.unsqueeze(1)).squeeze(1)
        return torch.zeros(part.count, dtype=theta.dtype).index_add(0, part.sequence, tokens)

    def example_gradients(self, theta: torch.Tensor, part: SequenceFeatures) -> torch.Tensor:
        """[count, P]: each sequence's loss gradient Σ_t (p_t − e_{y_t}) ⊗ a_t."""
        residual = self._probabilities(theta, part) - torch.nn.functional.one_hot(part.targets, self.head.weight.shape[0]).to(theta.dtype)
        per_token = (residual.unsqueeze(2) * part.inputs.unsqueeze(1)).flatten(1)
        return torch.zeros(part.count, per_token.shape[1], dtype=theta.dtype).index_add(0, part.sequence, per_token)

    def curvature(self, theta: torch.Tensor, part: SequenceFeatures, weights: torch.Tensor) -> torch.Tensor:
        """[P, P] Hessian of Σ_i weights_i · loss_i: Σ_t w_t (diag p_t − p_t p_tᵀ) ⊗ a_t a_tᵀ (exact: the head is linear)."""
        probs, inputs = self._probabilities(theta, part), part.inputs
        weighted = probs * weights[part.sequence].unsqueeze(1)
        outer = lambda p: (p.unsqueeze(2) * inputs.unsqueeze(1)).flatten(1)
        vocabulary, width = probs.shape[1], inputs.shape[1]
        matrix = -(outer(weighted).T @ outer(probs)).view(vocabulary, width, vocabulary, width)
        diagonal = torch.einsum("tv,ti,tj->vij", weighted, inputs, inputs)
        index = torch.arange(vocabulary)
        matrix[index, :, index, :] += diagonal
        return matrix.reshape(vocabulary * width, vocabulary * width)

    # -- the two stages --------------------------------------------------------------------------------
    def _weights(self, weights: torch.Tensor | None, dtype) -> torch.Tensor:
        return torch.ones(self.documents.count, dtype=dtype) if weights is None else weights

    def pretrain_objective(self, theta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._weights(weights, theta.dtype)
        return (weights * self.losses(theta, self.documents)).sum() / self.documents.count + 0.5 * self.weight_decay * theta.square().sum()

    def pretrain_hessian(self, theta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = self._weights(weights, theta.dtype)
        return self.curvature(theta, self.documents, weights) / self.documents.count + self.weight_decay * torch.eye(len(theta), dtype=theta.dtype)

    def finetune_loss_hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """H_ft: the Hessian of the mean completion loss alone (the proximal term is α I)."""
        return self.curvature(theta, self.pairs, torch.ones(self.pairs.count, dtype=theta.dtype)) / self.pairs.count

    def finetune_objective(self, theta: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return self.losses(theta, self.pairs).mean() + 0.5 * self.alpha * (theta - theta_pt).square().sum()

    def solve_pretraining(self, start: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return newton_minimise(lambda th: self.pretrain_objective(th, weights), start, lambda th: self.pretrain_hessian(th, weights))

    def solve_finetuning(self, start: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(len(start), dtype=start.dtype)
        return newton_minimise(lambda th: self.finetune_objective(th, theta_pt), start, lambda th: self.finetune_loss_hessian(th) + self.alpha * eye)

    def removal_effects(self, theta_pt: torch.Tensor, theta_ft: torch.Tensor, progress: bool = True) -> torch.Tensor:
        """[N, Q]: change of each query's loss when document i is removed and both stages re-solved
        (warm-started at the base solutions, where Newton converges in a few steps)."""
        base = self.losses(theta_ft, self.queries)
        effects = []
        for i in progress_bar(range(self.documents.count), desc="retraining", unit="document", enabled=progress):
            weights = torch.ones(self.documents.count, dtype=theta_pt.dtype)
            weights[i] = 0.0
            new_pt = self.solve_pretraining(theta_pt, weights)
            new_ft = self.solve_finetuning(theta_ft + (new_pt - theta_pt), new_pt)
            effects.append(self.losses(new_ft, self.queries) - base)
        return torch.stack(effects)


def hessian(objective, theta: torch.Tensor) -> torch.Tensor:
    """Dense exact Hessian [P, P] of a scalar objective (vectorised reverse-over-reverse autograd)."""
    matrix = torch.autograd.functional.hessian(objective, theta.detach(), vectorize=True)
    return 0.5 * (matrix + matrix.T)


def _value_and_gradient(objective, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    theta = theta.detach().requires_grad_(True)
    value = objective(theta)
    return float(value.detach()), torch.autograd.grad(value, theta)[0]


def newton_minimise(objective, start: torch.Tensor, curvature=None, tolerance: float = 1e-9, max_steps: int = 200) -> torch.Tensor:
    """Levenberg-damped Newton with the exact Hessian (`curvature(θ)`, autograd if not given) until ‖∇‖ < tolerance.

    Where the Hessian is indefinite or the full step overshoots, the damping μ grows until H + μI is
    positive definite and the step lowers the objective, and shrinks again after each success.
    """
    curvature = curvature or (lambda th: hessian(objective, th))
    theta = start.detach().clone()
    value, grad = _value_and_gradient(objective, theta)
    mu = 0.0
    eye = torch.eye(len(theta), dtype=theta.dtype)
    for _ in range(max_steps):
        if grad.norm() < tolerance:
            return theta
        matrix = curvature(theta)
        while True:
            factor, info = torch.linalg.cholesky_ex(matrix + mu * eye)
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


# -- a synthetic two-stage problem and the comparison of influence variants against retraining --------


@dataclass
class RetrainingSettings:
    documents: int = 50
    document_length: int = 24
    vocabulary: int = 24
    topics: int = 4  # each document is a random walk on one of these random transition matrices
    concentration: float = 0.3  # Dirichlet concentration of the transition rows: small = few likely successors
    pairs: int = 24
    queries: int = 8
    completion_length: int = 3
    hidden_size: int = 16
    weight_decay: float = 1e-2
    alpha: float = 1e-1
    warmup_steps: int = 200
    label_repeats: int = 16  # each sequence's labels are sampled this many times when fitting EK-FAC (true Fisher)
    fisher: str = "true"
    refine_iterations: int = 4  # ekfac-cg: preconditioned CG iterations per inverse of the chain (the method's default)
    seed: int = 0

    def __post_init__(self):
        counts = {"documents": 2, "document_length": 2, "vocabulary": 2, "topics": 1, "pairs": 1, "queries": 2, "completion_length": 1,
                  "hidden_size": 2, "label_repeats": 1, "refine_iterations": 1}
        for name, least in counts.items():
            if getattr(self, name) < least:
                raise PretraceError(f"retraining setting {name} must be at least {least}, got {getattr(self, name)}.")
        # Softmax regression is flat along "add the same vector to every row": only w > 0 makes pre-training strictly convex.
        for name in ("weight_decay", "alpha", "concentration"):
            if getattr(self, name) <= 0:
                raise PretraceError(f"retraining setting {name} must be positive, got {getattr(self, name)}.")
        if self.fisher not in ("true", "empirical"):
            raise PretraceError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}.")


def markov_corpus(settings: RetrainingSettings) -> tuple[list[Document], list[Query], list[Query]]:
    """Pre-training documents are random walks on topic-specific transition matrices; fine-tuning teaches a
    new rule (after a prompt from those walks, each completion token is a fixed random permutation π of the
    one before) that queries test on held-out prompts. The rule's tokens are the documents' tokens, so
    documents matter to the queries, but only through the directions fine-tuning leaves free: α(H_ft + αI)⁻¹
    is near 0 where the rule pins the head down, which single-stage influence cannot know."""
    rng = random.Random(settings.seed)
    size = settings.vocabulary
    words = [f"w{i}" for i in range(size)]

    def row() -> list[float]:
        draws = [rng.gammavariate(settings.concentration, 1.0) for _ in range(size)]
        return [d / sum(draws) for d in draws]

    topics = [[row() for _ in range(size)] for _ in range(settings.topics)]

    def walk(length: int, topic: list[list[float]]) -> list[int]:
        tokens = [rng.randrange(size)]
        while len(tokens) < length:
            tokens.append(rng.choices(range(size), topic[tokens[-1]])[0])
        return tokens

    text = lambda tokens: " ".join(words[t] for t in tokens)
    documents = [Document(str(i), text(walk(settings.document_length, topics[i % settings.topics]))) for i in range(settings.documents)]
    permutation = list(range(size))
    rng.shuffle(permutation)

    def rule(name: str) -> Query:
        prompt = walk(4, topics[rng.randrange(settings.topics)])
        completion = [permutation[prompt[-1]]]
        while len(completion) < settings.completion_length:
            completion.append(permutation[completion[-1]])
        return Query(name, text(prompt), " " + text(completion))

    pairs = [rule(f"pair{i}") for i in range(settings.pairs)]
    return documents, pairs, [rule(f"query{i}") for i in range(settings.queries)]


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
    """(problem, tokenizer, documents, pairs, queries): a 1-layer GPT-NeoX whose LM head is the trained part."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    documents, pairs, queries = markov_corpus(settings)
    tokenizer = word_tokenizer([d.text for d in documents] + [q.prompt + q.completion for q in pairs + queries])
    torch.manual_seed(settings.seed)
    h = settings.hidden_size
    config = GPTNeoXConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=h, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=2 * h, rotary_pct=0.5, max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    batch = lambda encoded: collate(list(encoded), 0)
    document_batch = batch(encode_documents(tokenizer, documents, 512))
    # The frozen transformer gets useful features from a short unregularised warm-up of the whole model on the documents.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(settings.warmup_steps):
        optimizer.zero_grad()
        LanguageModelingTask().document_loss(model, document_batch).mean().backward()
        optimizer.step()
    features = lambda encoded: SequenceFeatures.of(model, batch(encoded))
    problem = HeadProblem(model, features(encode_documents(tokenizer, documents, 512)), features(encode_queries(tokenizer, pairs, 512)),
                          features(encode_queries(tokenizer, queries, 512)), settings.weight_decay, settings.alpha)
    return problem, tokenizer, documents, pairs, queries


def tracked_head(model: torch.nn.Module):
    from pretrace.modeling.modules import select_modules

    return select_modules(model, preset="all-parameters", regex=r"^lm_head$")


def compare_influences(settings: RetrainingSettings, progress: bool = True) -> dict:
    """Retrain after removing each document; return the actual Δ query loss and each method's prediction [N, Q]."""
    from pretrace.curvature import EKFAC, Chain, FitSettings, Identity, Scaled, fit_factors
    from pretrace.data.batching import iter_batches
    from pretrace.scores import score_documents
    from pretrace.scores.queries import precondition_queries

    problem, tokenizer, documents, pairs, queries = build_problem(settings)
    theta_pt = problem.solve_pretraining(problem.flat())
    theta_ft = problem.solve_finetuning(theta_pt, theta_pt)
    n, w, alpha = len(documents), settings.weight_decay, settings.alpha
    actual = problem.removal_effects(theta_pt, theta_ft, progress=progress)

    # Exact: dense Hessians. H_pt and the documents' Hessian at θ_ft (single-stage) include the weight decay w.
    h_pt, h_docs_ft = problem.pretrain_hessian(theta_pt), problem.pretrain_hessian(theta_ft)
    h_ft = problem.finetune_loss_hessian(theta_ft)
    queries_ft, queries_pt = problem.example_gradients(theta_ft, problem.queries), problem.example_gradients(theta_pt, problem.queries)
    docs_pt, docs_ft = problem.example_gradients(theta_pt, problem.documents), problem.example_gradients(theta_ft, problem.documents)
    eye = torch.eye(len(theta_pt), dtype=theta_pt.dtype)
    scores = {
        "exact multi-stage": alpha * queries_ft @ torch.linalg.solve(h_ft + alpha * eye, torch.linalg.solve(h_pt, docs_pt.T)),
        "exact fine-tuned only": queries_ft @ torch.linalg.solve(h_docs_ft, docs_ft.T),
        "exact pre-trained only": queries_pt @ torch.linalg.solve(h_pt, docs_pt.T),
    }

    # EK-FAC: the library's fitting, preconditioners and scoring on the model itself.
    model, tracked = problem.model, tracked_head(problem.model)
    fit = FitSettings(fisher=settings.fisher, seed=settings.seed, factor_dtype="float64")
    repeats = settings.label_repeats if settings.fisher == "true" else 1
    doc_batches = lambda: iter_batches(encode_documents(tokenizer, documents, 512), 64, 0)

    def factors(theta, encode, records):
        problem.load(theta)
        return fit_factors(model, tracked, lambda: iter_batches(encode(tokenizer, records * repeats, 512), 64, 0), fit, progress=False)

    def score(preconditioner, theta_queries, theta_docs):
        """The one query preparation (queries measured at `theta_queries`), then documents' gradients at `theta_docs`."""
        problem.load(theta_queries)
        prepared = precondition_queries(model, tracked, iter_batches(encode_queries(tokenizer, queries, 512), 64, 0), preconditioner)
        problem.load(theta_docs)
        return score_documents(model, tracked, prepared.weights, doc_batches(), prepared.ids).scores

    pt_factors = factors(theta_pt, encode_documents, documents)
    ft_factors = factors(theta_ft, encode_queries, pairs)
    ft_doc_factors = factors(theta_ft, encode_documents, documents)
    scores["EK-FAC multi-stage"] = score(Scaled(Chain([EKFAC(ft_factors, damping=alpha), EKFAC(pt_factors, damping=w)]), alpha), theta_ft, theta_pt)
    scores["EK-FAC fine-tuned only"] = score(EKFAC(ft_doc_factors, damping=w), theta_ft, theta_ft)
    scores["EK-FAC pre-trained only"] = score(EKFAC(pt_factors, damping=w), theta_pt, theta_pt)
    refined = refined_chain(problem, tokenizer, documents, pairs, pt_factors, ft_factors, theta_pt, theta_ft, settings)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CG: ")  # an iteration budget below convergence, by design
        scores[f"EK-FAC-CG multi-stage ({settings.refine_iterations} iterations)"] = score(refined, theta_ft, theta_pt)
    scores["gradient dot product"] = score(Identity(), theta_ft, theta_pt)
    return {"actual": actual, "predicted": {name: s.detach().T / n for name, s in scores.items()}}


def refined_chain(problem: HeadProblem, tokenizer, documents, pairs, pt_factors, ft_factors, theta_pt, theta_ft, settings: RetrainingSettings):
    """α (H_ft + αI)⁻¹ (H_pt)⁻¹ with each inverse by CG on the exact head curvature, preconditioned by its EK-FAC
    inverse: the library's `ekfac-cg`. H_pt's products run on a copy of the model holding θ_pt, H_ft's on the model
    itself, which holds θ_ft whenever queries are preconditioned."""
    import copy

    from pretrace.baselines.cg import ConjugateGradient
    from pretrace.baselines.curvature_products import CurvatureProducts
    from pretrace.curvature import EKFAC, Chain, Scaled
    from pretrace.data.batching import iter_batches

    problem.load(theta_pt)
    pretrained = copy.deepcopy(problem.model)
    problem.load(theta_ft)
    w, alpha = settings.weight_decay, settings.alpha

    def solver(model, batches, factors, damping):
        products = CurvatureProducts(model, tracked_head(model), list(batches), "ggn")
        return ConjugateGradient(products, settings.refine_iterations, 1e-12, damping=damping,
                                 preconditioner=lambda damped: EKFAC(factors, damping=damped))

    ft = solver(problem.model, iter_batches(encode_queries(tokenizer, pairs, 512), 64, 0), ft_factors, alpha)
    pt = solver(pretrained, iter_batches(encode_documents(tokenizer, documents, 512), 64, 0), pt_factors, w)
    return Scaled(Chain([ft, pt]), alpha)


def correlations(actual: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """Pearson over all (document, query) pairs, and the mean over queries of per-query Pearson/Spearman."""
    from pretrace.metrics import pearson, spearman

    columns = range(actual.shape[1])
    return {
        "pearson_pooled": float(pearson(predicted.flatten(), actual.flatten())),
        "pearson_per_query": sum(float(pearson(predicted[:, q], actual[:, q])) for q in columns) / actual.shape[1],
        "spearman_per_query": sum(float(spearman(predicted[:, q], actual[:, q])) for q in columns) / actual.shape[1],
    }
