"""A memory plan before any model work: the peak resident memory a command will need, predicted from the model's
shapes (its config instantiated on the meta device: no weights are read), the tracked modules, the batch and
sequence sizes, the factors, the query weights and the scores. A plan over the budget (--memory-gb, by default the
memory available on the machine or the device) is refused, naming what would fit; `--batch-size auto` takes the
largest batch that fits. Every part is an upper estimate of what the code holds at its peak, summed (the parts of
one pass are held together); `tests/test_memory_plan.py` checks the totals against peaks measured on small models.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.modeling.loading import DEFAULT_MAX_LENGTH, DTYPES, position_limit
from pretrace.modeling.modules import select_modules

GB = 1e9
# Calibrated on 2026-12-07 against peaks of `pretrace fit` measured at batch 1 and 32 (128 tokens) on four GPT-NeoX
# shapes (hidden 256/512, 4/8 layers, vocabulary 4096/16384), CPU, float32: each measured peak was 0.96-1.08 of the
# plan; on a 1.1B Llama (benchmarks/billion.py) 0.92 (fit) and 1.01 (multi-stage score).
RUNTIME_BYTES = 350_000_000  # the interpreter with torch, transformers and tokenizers imported, the loaded model's transients
ACTIVATION_WORDS = 2  # numbers per token, hidden unit and layer kept by a forward+backward beyond the captured module inputs
LOGIT_COPIES = 3  # float32 numbers per token and vocabulary entry: logits, their log-softmax and its gradient
BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ModelShapes:
    """What a plan needs of a model: sizes and the tracked modules' (name, d_out, d_in', blocks)."""

    parameters: int
    parameter_bytes: int
    hidden: int
    intermediate: int
    layers: int
    vocabulary: int
    heads: int
    tracked: tuple[tuple[str, int, int, int], ...]
    positions: int | None


def model_shapes(path: str | Path | None, options, model: torch.nn.Module | None = None) -> ModelShapes | None:
    """The shapes of a model folder (instantiated on the meta device) or of a loaded `model`; None for what has no
    plain config (an adapter folder, a hub name): such runs go unplanned."""
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if path is None or not (Path(path) / "config.json").is_file():
            return None
        try:
            config = AutoConfig.from_pretrained(str(path))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception:  # an architecture transformers cannot build: loading it will say why
            return None
    config = model.config
    tracked = select_modules(model, options.preset, options.modules, options.attention_blocks)
    dtype = DTYPES[options.dtype] if options.dtype in DTYPES else next(model.parameters()).dtype
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return ModelShapes(
        parameters=sum(p.numel() for p in model.parameters()), parameter_bytes=torch.finfo(dtype).bits // 8, hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        layers=getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1), vocabulary=config.vocab_size,
        heads=getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1),
        tracked=tuple((t.name, t.d_out, t.d_in_total, t.n_blocks) for t in tracked), positions=position_limit(model))


@dataclass
class MemoryPlan:
    """Predicted peak bytes of one command, by part."""

    command: str
    parts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"  # where the peak is measured: resident memory of this process, or torch's peak on a GPU

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        largest = sorted(self.parts.items(), key=lambda item: -item[1])
        return f"memory plan of `pretrace {self.command}`: {self.total / GB:.2f} GB (" + ", ".join(f"{k} {v / GB:.2f}" for k, v in largest) + ")"

    def prediction(self) -> dict:
        """The plan as recorded in a result that must stay reproducible (factors: no measured value)."""
        return {"predicted_peak_bytes": self.total, "parts": dict(self.parts)}

    def record(self) -> dict:
        """The plan beside the measured peak of this process so far (Linux getrusage: kilobytes)."""
        measured = measured_peak_bytes(self.device)
        return {**self.prediction(), "measured_peak_bytes": measured, "measured_over_predicted": measured / self.total}

    def report(self) -> str:
        """One line: the measured peak against the plan (printed at the end of a run)."""
        measured = measured_peak_bytes(self.device)
        return f"peak memory: measured {measured / GB:.2f} GB, planned {self.total / GB:.2f} GB ({measured / self.total:.2f}x)"


def reset_peak(device: str = "cpu") -> None:
    """Start measuring this run's peak afresh: on a GPU torch's peak statistics; on Linux the peak resident size,
    reset when 5 is written to /proc/self/clear_refs (a process started by a large one would otherwise report its
    parent's peak)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def measured_peak_bytes(device: str = "cpu") -> int:
    """The peak since `reset_peak`: torch's allocated peak on a GPU, else this process's resident peak (Linux VmHWM;
    getrusage elsewhere)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def one_pass(shapes: ModelShapes, batch: int, length: int, compute_bytes: int = 4) -> dict[str, int]:
    """One forward+backward with the tracked modules' inputs and output gradients captured."""
    tokens = batch * length
    activations = tokens * shapes.parameter_bytes * ACTIVATION_WORDS * shapes.layers * shapes.hidden
    attention = 4 * batch * shapes.heads * length * length * shapes.layers
    logits = 4 * tokens * shapes.vocabulary * LOGIT_COPIES
    captured = compute_bytes * tokens * sum(d_out + d_in for _, d_out, d_in, _ in shapes.tracked)
    return {"runtime": RUNTIME_BYTES, "weights": shapes.parameters * shapes.parameter_bytes, "forward+backward": activations + attention + logits,
            "captured": captured}


def _factor_bytes(shapes: ModelShapes, bytes_per_number: int) -> int:
    """A, G (per block), their eigenvectors and eigenvalues, and Λ, of every tracked module."""
    return bytes_per_number * sum(2 * d_in * d_in + 2 * d_out * (d_out // blocks) + d_out * d_in for _, d_out, d_in, blocks in shapes.tracked)


def fit_plan(shapes: ModelShapes, batch: int, length: int, factor_dtype: str) -> MemoryPlan:
    """The largest of fit's three phases, beside the weights and the runtime: the covariance pass (its float64
    sums), the eigendecompositions (the sums, the factors written so far, the largest module's workspace) and the
    eigenvalue-correction pass (the factors, Λ's float64 sums, one batch's rotated per-example gradients)."""
    stored = torch.finfo(DTYPES[factor_dtype]).bits // 8
    pass_ = one_pass(shapes, batch, length)
    forward = {"forward+backward": pass_.pop("forward+backward"), "captured": pass_.pop("captured")}
    covariance_sums = 8 * sum(d_in * d_in + d_out * (d_out // blocks) for _, d_out, d_in, blocks in shapes.tracked)
    factors = _factor_bytes(shapes, stored)
    lambda_bytes = sum(d_out * d_in for _, d_out, d_in, _ in shapes.tracked)
    largest = max(max(d_in * d_in, d_out * d_out // blocks) for _, d_out, d_in, blocks in shapes.tracked)
    phases = [
        {**forward, "covariance sums (float64)": covariance_sums},
        {"covariance sums (float64)": covariance_sums, "factors": factors - stored * lambda_bytes, "eigendecomposition": 8 * 4 * largest},
        {**forward, "factors": factors, "Λ sums (float64)": 8 * lambda_bytes,
         "rotated gradients": 4 * batch * max(d_out * d_in for _, d_out, d_in, _ in shapes.tracked)},
    ]
    return MemoryPlan("fit", {**pass_, **max(phases, key=lambda parts: sum(parts.values()))})


def score_plan(shapes: ModelShapes, batch: int, length: int, queries: int, documents: int, stages: int, query_rank: int | None,
               per_module: bool) -> MemoryPlan:
    """The models and factors of `stages` stages, the queries' preconditioned weights (dense per module, or rank
    `query_rank`), one batch's per-example gradients (the widest module's), and the [queries × documents] scores."""
    weights = sum(d_out * d_in if query_rank is None else min(d_out * d_in, query_rank * (d_out + d_in)) for _, d_out, d_in, _ in shapes.tracked)
    pass_ = one_pass(shapes, batch, length)
    pass_["weights"] *= stages
    return MemoryPlan("score", {**pass_, "factors": stages * _factor_bytes(shapes, 4), "query weights": 4 * queries * weights * 2,
                                "per-example gradients": 4 * batch * max(d_out * d_in for _, d_out, d_in, _ in shapes.tracked),
                                "scores": 8 * queries * documents + (4 * len(shapes.tracked) * queries * documents if per_module else 0)})


def index_plan(shapes: ModelShapes, batch: int, length: int, storage: str, shard_batches: int, sketch_width: int | None) -> MemoryPlan:
    """One shard held before it is written: exact gradients, token factors, or float16 sketches."""
    per_document = {"exact": 4 * sum(d_out * d_in for _, d_out, d_in, _ in shapes.tracked),
                    "factored": 4 * length * sum(d_out + d_in for _, d_out, d_in, _ in shapes.tracked)}.get(storage, 2 * (sketch_width or 0))
    return MemoryPlan("index", {**one_pass(shapes, batch, length), "shard": per_document * batch * shard_batches})


def exact_width(shapes: ModelShapes, dim: int) -> int:
    """The width of a corpus store's vectors: Σ over modules of min(k, d_out) × min(k, d_in')."""
    return sum(min(dim, d_out) * min(dim, d_in) for _, d_out, d_in, _ in shapes.tracked)


def available_bytes(device: torch.device) -> int:
    """What the budget defaults to: the device's free memory, or the machine's available memory (Linux MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(options) -> int:
    return int(options.memory_gb * GB) if options.memory_gb is not None else available_bytes(options.torch_device())


def sequence_length(shapes: ModelShapes, max_length: int | None) -> int:
    """The --max-length a run will use (the default resolved against the model's positions, as loading does)."""
    return max_length or (min(DEFAULT_MAX_LENGTH, shapes.positions) if shapes.positions else DEFAULT_MAX_LENGTH)


def planned_options(options, plan_for) -> tuple[object, MemoryPlan]:
    """The options with `--batch-size auto` resolved to the largest batch whose plan fits the budget, and that
    plan; a fixed batch's plan over the budget is refused. `plan_for(batch)` makes the command's plan."""
    budget = budget_bytes(options)
    if options.batch_size == "auto":
        fitting = [b for b in BATCH_CHOICES if plan_for(b).total <= budget]
        if not fitting:
            refuse(plan_for(1), budget, "even one sequence a batch")
        options = replace(options, batch_size=fitting[-1])
    plan = plan_for(options.batch_size)
    if plan.total > budget:
        refuse(plan, budget, f"--batch-size {options.batch_size}")
    return options, plan


def refuse(plan: MemoryPlan, budget: int, what: str) -> None:
    """Exit 2 before any model work, naming the parts over the budget and what shrinks them."""
    largest = max(plan.parts, key=plan.parts.get)
    remedies = {"forward+backward": "a smaller --batch-size (or --batch-size auto) or --max-length", "captured": "a smaller --batch-size or fewer --modules",
                "factors": "fewer tracked modules (--modules, --preset mlp), or --factors-device cpu / --shard-factors on a GPU",
                "covariance sums (float64)": "fewer tracked modules (--modules, --preset mlp)", "Λ sums (float64)": "fewer tracked modules (--modules, --preset mlp)",
                "eigendecomposition": "fewer or narrower tracked modules (--modules)", "query weights": "--query-rank (rank-truncated query weights) or fewer queries",
                "scores": "fewer queries or documents per run, or --scores-on-disk", "weights": "--dtype bfloat16, or a machine with more memory",
                "per-example gradients": "a smaller --batch-size", "rotated gradients": "a smaller --batch-size", "shard": "a smaller --batches-per-shard"}
    raise PretraceError(f"{plan.describe()} exceeds the memory budget of {budget / GB:.2f} GB with {what}; its largest part is {largest}: "
                        f"use {remedies.get(largest, 'a smaller --batch-size')} — or raise --memory-gb if the machine has more.")



def plan_run(path: str | Path | None, options, plan_for, model: torch.nn.Module | None = None) -> tuple[object, MemoryPlan | None]:
    """The options (`--batch-size auto` resolved) and the plan `plan_for(shapes, batch, length)` of a run on the
    model folder `path` (or the loaded `model`); a plan over the budget is refused before any model work. A model
    without a plain config (an adapter, a hub name) runs unplanned."""
    shapes = model_shapes(path, options, model)
    if shapes is None:
        if options.batch_size == "auto":
            raise PretraceError(f"--batch-size auto needs a memory plan, and {path} has no config.json to plan from (an adapter folder or a hub "
                                "name); pass a number of sequences.")
        return options, None
    length = sequence_length(shapes, options.max_length)
    device = str(options.torch_device())
    reset_peak(device)
    return planned_options(options, lambda batch: on_device(plan_for(shapes, batch, length), device))


def on_device(plan: MemoryPlan, device: str) -> MemoryPlan:
    """The plan of a run on `device`: on a GPU the interpreter's memory is the host's, not the device's."""
    if device.startswith("cuda"):
        return MemoryPlan(plan.command, {k: v for k, v in plan.parts.items() if k != "runtime"}, device)
    return plan
