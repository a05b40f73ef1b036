"""Benchmark 1: quality versus cost of every attribution method on a toy GPT-NeoX (the paper's scalability study).

Stages, each cached in the output folder (a finished stage is skipped, so a killed run resumes):

1. `model/`: a toy GPT-NeoX pre-trained on Penn Treebank (learning rate stepped every optimizer step),
   its validation loss recorded in `model/pretrace_pretrain.json`.
2. `problem.json` + `queries.jsonl`, `candidates.jsonl`, `fit.jsonl`: query sentences from PTB test, for
   each its own candidate sentences from the training documents (all candidates are pooled into one file
   and every query is correlated over its own block only), and the fixed curvature-fitting set.
3. `scores/ground-truth-all/`: conjugate gradient on damped Gauss-Newton products over all tracked
   parameters and the fitting set, run to the preset's tolerance (its `last_solve` says how far it got).
4. `scores/<alg>/`: every method for scopes all and mlp (EK-FAC factors in `factors-<scope>/`; TRAK's
   ensemble in `halves/`, models trained on random halves of the training documents).
5. `results.json`: per-query Pearson/Spearman, mean ± std over queries, against the ground truth, one-off
   and per-query seconds, with the fields of the seed's `scalability_results.json`; `results.png`.

Correlations keep their sign (the published results stored absolute values to hide a sign bug in CG).
The linear datamodeling score (a second ground truth) is not implemented yet.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pretrace.config import option
from pretrace.errors import PretraceError
from pretrace.metrics import pearson, spearman
from pretrace.storage import read_json, write_json, write_jsonl

SCOPES = ("all", "mlp")
# (color, marker) per method family, as in the seed's results file
STYLES = {"ground-truth": ("k", "^"), "cg": ("k", "^"), "ekfac": ("fuchsia", "o"), "lissa": ("c", "*"), "gdp": ("r", "p"),
          "cka": ("k", "p"), "arnoldi": ("y", "D"), "trak": ("g", "X")}


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; `paper` is the seed's experiment, the others shrink it."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocab_size: int | None  # None: the GPT-NeoX-20B tokenizer; else a BPE of that size trained on PTB
    max_length: int
    train_sentences: int | None  # None: all of PTB train
    epochs: int
    lr: float
    batch_size: int
    queries: int
    candidates: int
    fit_documents: int
    damping: float
    tolerance: float
    ground_truth_iterations: int
    cg_iterations: tuple[int, ...]
    lissa_depths: tuple[int, ...]
    arnoldi_rank: int
    arnoldi_iterations: int
    trak_models: int
    projection_dim: int
    score_batch_size: int = 16
    validation_sentences: int = 1000


PRESETS = {
    "paper": Preset(256, 2, 2, 1024, None, 512, None, 3, 1e-3, 32, 10, 500, 32, 1e-4, 1e-6, 2000,
                    (50, 500, 1000), (500, 2000, 5000, 10000), 20, 200, 10, 4096),
    "cpu": Preset(64, 2, 2, 256, 2000, 48, 8000, 2, 3e-3, 32, 10, 150, 32, 1e-2, 1e-3, 500,
                  (5, 20, 100), (50, 200), 20, 60, 4, 1024),
    "micro": Preset(32, 1, 2, 64, 320, 24, 200, 1, 3e-3, 16, 2, 8, 8, 1e-2, 1e-3, 200,
                    (2,), (4,), 3, 6, 2, 32, score_batch_size=8, validation_sentences=50),
}


@dataclass
class QualityVsCostSettings:
    preset: str = option("cpu", choices=tuple(PRESETS), help="Sizes: 'paper' (the seed's toy GPT-NeoX, for a GPU), 'cpu' (a smaller model and BPE, under an hour on 2 cores) or 'micro' (seconds; tests).")
    out: str = option("runs/quality-vs-cost", help="Working folder; every stage is cached there and a re-run resumes.")
    seed: int = option(0, help="Seed of sampling, training, fitting and projections.")
    device: str = option("auto", help="'cpu', 'cuda', ... or 'auto'.")


@dataclass
class Run:
    """One benchmark run: its folder, sizes and the stage timings gathered so far (`timings.json`)."""

    folder: Path
    preset: Preset
    seed: int
    device: str
    timings: dict = field(default_factory=dict)

    def stage(self, name: str) -> None:
        print(f"[quality-vs-cost] {name}", flush=True)

    def record_time(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 2)
        write_json(self.folder / "timings.json", self.timings)


# -- stage 1: the toy model ------------------------------------------------------------------------

def model_config(preset: Preset):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=preset.hidden_size, num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                         intermediate_size=preset.intermediate_size, rotary_pct=0.25, max_position_embeddings=max(128, preset.max_length),
                         attention_dropout=0.0, hidden_dropout=0.0, use_parallel_residual=True)


def training_documents(preset: Preset):
    from pretrace.data.ptb import ptb_documents

    return ptb_documents("train", limit=preset.train_sentences)


def train_settings(run: Run):
    from pretrace.training.loop import TrainSettings

    p = run.preset
    return TrainSettings(lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, max_length=p.max_length, warmup=0.05, seed=run.seed, device=run.device)


def tokenizer_for(preset: Preset, documents):
    from pretrace.data.bpe import neox_tokenizer, train_bpe

    return neox_tokenizer() if preset.vocab_size is None else train_bpe((d.text for d in documents), preset.vocab_size)


def train_model(run: Run, out: Path, documents, tokenizer, seed: int) -> Path:
    """Pre-train into `out` unless it already holds a model."""
    if (out / "config.json").is_file():
        return out
    from pretrace.data.ptb import ptb_documents
    from pretrace.training.pretrain import pretrain

    started = time.perf_counter()
    validation = ptb_documents("valid", limit=run.preset.validation_sentences)
    pretrain(model_config(run.preset), tokenizer, documents, replace(train_settings(run), seed=seed), validation=validation, out=out)
    run.record_time(f"train {out.name}", time.perf_counter() - started)
    return out


def stage_model(run: Run) -> Path:
    run.stage("1. train the toy model")
    documents = training_documents(run.preset)
    tokenizer = None if (run.folder / "model" / "config.json").is_file() else tokenizer_for(run.preset, documents)
    return train_model(run, run.folder / "model", documents, tokenizer, run.seed)


def validation_loss(model: Path) -> float | None:
    losses = read_json(model / "pretrace_pretrain.json").get("validation_losses") or [None]
    return losses[-1]


# -- stage 2: queries, candidates and the fitting set ----------------------------------------------

def stage_problem(run: Run) -> dict:
    """Query sentences from PTB test, `candidates` training sentences per query and the fitting set."""
    run.stage("2. sample queries, candidates and the fitting set")
    manifest = run.folder / "problem.json"
    if manifest.is_file():
        return read_json(manifest)
    from pretrace.data.ptb import ptb_documents

    p, rng = run.preset, random.Random(run.seed)
    train = training_documents(p)
    needed = p.queries * p.candidates + p.fit_documents
    if needed > len(train):
        raise PretraceError(f"the preset needs {needed} training sentences but has {len(train)}; raise train_sentences.")
    queries = rng.sample(ptb_documents("test"), p.queries)
    picked = rng.sample(train, needed)
    candidates, fitting = picked[: p.queries * p.candidates], picked[p.queries * p.candidates :]
    write_jsonl(run.folder / "queries.jsonl", ({"id": q.id, "text": q.text} for q in queries))
    write_jsonl(run.folder / "candidates.jsonl", ({"id": d.id, "text": d.text} for d in candidates))
    write_jsonl(run.folder / "fit.jsonl", ({"id": d.id, "text": d.text} for d in fitting))
    problem = {"queries": [q.id for q in queries], "candidates_per_query": p.candidates,
               "candidate_blocks": "query q is correlated over candidates [q*C, (q+1)*C) of candidates.jsonl",
               "fit_documents": len(fitting)}
    write_json(manifest, problem)
    return problem


# -- stages 3 and 4: ground truth and methods ------------------------------------------------------

@dataclass(frozen=True)
class MethodRun:
    """One row of the table: a method name in the seed's style, its scope and its score settings."""

    alg: str
    family: str
    scope: str
    settings: dict
    budgeted: bool = False  # an iteration budget below convergence: CG's "did not converge" warning is expected


def method_runs(run: Run, halves: list[Path]) -> list[MethodRun]:
    p = run.preset
    solver = {"damping": p.damping, "fit_data": str(run.folder / "fit.jsonl")}
    runs = [MethodRun("ground-truth-all", "ground-truth", "all",
                      {"method": "cg", "iterations": p.ground_truth_iterations, "tolerance": p.tolerance, **solver})]
    for scope in SCOPES:
        runs.append(MethodRun(f"ekfac-{scope}", "ekfac", scope, {"method": "ekfac", "factors": str(run.folder / f"factors-{scope}")}))
        if scope == "mlp":
            runs.append(MethodRun("cg-mlp", "cg", scope, {"method": "cg", "iterations": p.ground_truth_iterations, "tolerance": p.tolerance, **solver}))
        for budget in p.cg_iterations:
            runs.append(MethodRun(f"cg-{scope}-iters={budget}", "cg", scope, {"method": "cg", "iterations": budget, "tolerance": 1e-12, **solver}, budgeted=True))
        for depth in p.lissa_depths:
            runs.append(MethodRun(f"lissa-{scope}-iters={depth}", "lissa", scope, {"method": "lissa", "lissa_depth": depth, **solver}))
        runs.append(MethodRun(f"arnoldi-{scope}", "arnoldi", scope, {"method": "arnoldi", "arnoldi_rank": p.arnoldi_rank,
                                                                      "arnoldi_iterations": p.arnoldi_iterations, **solver}))
        runs.append(MethodRun(f"gdp-{scope}", "gdp", scope, {"method": "gradient-dot"}))
        runs.append(MethodRun(f"cka-{scope}", "cka", scope, {"method": "cka"}))
        runs.append(MethodRun(f"trak-{scope}", "trak", scope, {"method": "trak", "projection_dim": p.projection_dim,
                                                                "trak_models": ",".join(str(h) for h in halves), "projection_seed": run.seed}))
    return runs


def model_options(run: Run, scope: str):
    from pretrace.workflows.common import ModelOptions

    return ModelOptions(preset=scope, max_length=run.preset.max_length, batch_size=run.preset.score_batch_size, device=run.device)


def stage_factors(run: Run, model: Path) -> dict[str, float]:
    """EK-FAC factors per scope on the fitting set; returns their fitting seconds (EK-FAC's one-off cost)."""
    from pretrace.curvature import FitSettings
    from pretrace.workflows.fit import fit

    seconds = {}
    for scope in SCOPES:
        out = run.folder / f"factors-{scope}"
        key = f"ekfac factors {scope}"
        if not (out / "factors.json").is_file():
            started = time.perf_counter()
            fit(model, run.folder / "fit.jsonl", out, model_options(run, scope), FitSettings(seed=run.seed), overwrite=True)
            run.record_time(key, time.perf_counter() - started)
        seconds[scope] = run.timings.get(key, 0.0)
    return seconds


def stage_halves(run: Run) -> list[Path]:
    """TRAK's ensemble: models trained (like the main one) on seeded random halves of the training documents."""
    run.stage(f"4a. train {run.preset.trak_models} TRAK models on random halves")
    documents = training_documents(run.preset)
    tokenizer = None
    paths = []
    for member in range(run.preset.trak_models):
        out = run.folder / "halves" / f"half-{member}"
        if not (out / "config.json").is_file():
            from pretrace.modeling.loading import load_tokenizer

            tokenizer = tokenizer or load_tokenizer(run.folder / "model")
            half = random.Random(f"{run.seed}/half/{member}").sample(documents, len(documents) // 2)
            train_model(run, out, half, tokenizer, run.seed + 1 + member)
        paths.append(out)
    return paths


def stage_scores(run: Run, model: Path, method: MethodRun) -> Path:
    """Scores of one method (cached: its folder is skipped when complete)."""
    from pretrace.workflows.score import ScoreSettings, score

    out = run.folder / "scores" / method.alg
    if not (out / "scores.json").is_file():
        settings = ScoreSettings(queries=str(run.folder / "queries.jsonl"), train=str(run.folder / "candidates.jsonl"), out=str(out),
                                 model=str(model), explain=False, overwrite=True, solver_seed=run.seed, **method.settings)
        with warnings.catch_warnings():
            if method.budgeted:
                warnings.filterwarnings("ignore", message="CG: ")
            score(settings, model_options(run, method.scope))
    return out


# -- stage 5: correlations and the table -----------------------------------------------------------

def per_query_correlations(scores: torch.Tensor, truth: torch.Tensor, candidates: int) -> tuple[list[float], list[float]]:
    """Pearson and Spearman of each query's row with the ground truth over its own block of candidates."""
    pcs, scs = [], []
    for q in range(scores.shape[0]):
        block = slice(q * candidates, (q + 1) * candidates)
        pcs.append(pearson(scores[q, block], truth[q, block]))
        scs.append(spearman(scores[q, block], truth[q, block]))
    return pcs, scs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def result_row(method: MethodRun, scores: torch.Tensor, truth: torch.Tensor, candidates: int, timings: dict, extra_one_off: float) -> dict:
    pcs, scs = per_query_correlations(scores, truth, candidates)
    (pc, pc_std), (sc, sc_std) = _mean_std(pcs), _mean_std(scs)
    color, marker = STYLES[method.family]
    return {"alg": method.alg, "pc": pc, "sc": sc, "pc-std": pc_std, "sc-std": sc_std,
            "overhead": round(timings["one_off_seconds"] + extra_one_off, 3), "job": round(timings["per_query_seconds"], 4),
            "color": color, "marker": marker, "per_query_pearson": pcs, "per_query_spearman": scs}


def plot_results(rows: list[dict], path: Path) -> Path:
    """Correlation with the ground truth against per-query seconds (log x), as the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, key, label in ((axes[0], "pc", "Pearson"), (axes[1], "sc", "Spearman")):
        for row in rows:
            filled = "-mlp" not in row["alg"]
            axis.errorbar(row["job"], row[key], yerr=row[f"{key}-std"], fmt=row["marker"], color=row["color"],
                          mfc=row["color"] if filled else "none", capsize=2, alpha=0.8)
            axis.annotate(row["alg"], (row["job"], row[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("per-query time (s, log scale)")
        axis.set_ylabel(f"{label} correlation with converged CG")
        axis.grid(alpha=0.3)
    figure.suptitle("Quality versus cost (filled: all parameters, hollow: MLP only)")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def check_same_run(folder: Path, settings: QualityVsCostSettings) -> None:
    """Cached stages are only valid for the preset and seed that made them: refuse to mix runs in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    identity, path = {"preset": settings.preset, "seed": settings.seed}, folder / "run.json"
    if path.is_file() and read_json(path) != identity:
        raise PretraceError(f"{folder} holds a run with {read_json(path)}, not {identity}; pass another --out (or delete that folder).")
    write_json(path, identity)


def run_quality_vs_cost(settings: QualityVsCostSettings) -> list[dict]:
    """Run (or resume) every stage; returns the rows written to `results.json`."""
    from pretrace.scores.io import load_scores

    if settings.preset not in PRESETS:
        raise PretraceError(f"unknown --preset {settings.preset!r}; choose one of {sorted(PRESETS)}.")
    folder = Path(settings.out)
    check_same_run(folder, settings)
    timings_path = folder / "timings.json"
    run = Run(folder, PRESETS[settings.preset], settings.seed, settings.device,
              json.loads(timings_path.read_text()) if timings_path.is_file() else {})
    torch.manual_seed(settings.seed)
    model = stage_model(run)
    problem = stage_problem(run)
    run.stage("3-4. EK-FAC factors")
    factor_seconds = stage_factors(run, model)
    halves = stage_halves(run)
    trak_training = sum(run.timings.get(f"train {h.name}", 0.0) for h in halves)
    methods = method_runs(run, halves)
    rows, truth = [], None
    for index, method in enumerate(methods, start=1):
        run.stage(f"3-4. [{index}/{len(methods)}] {method.alg}")
        started = time.perf_counter()
        tensors, metadata = load_scores(stage_scores(run, model, method))
        run.timings.setdefault(f"score {method.alg}", round(time.perf_counter() - started, 2))
        scores = tensors["scores"].double()
        truth = scores if truth is None else truth
        extra = factor_seconds[method.scope] if method.family == "ekfac" else trak_training if method.family == "trak" else 0.0
        rows.append(result_row(method, scores, truth, problem["candidates_per_query"], metadata["timings"], extra))
    run.stage("5-6. results.json and results.png")
    write_json(folder / "timings.json", run.timings)
    summary = {"preset": settings.preset, "validation_loss": validation_loss(model), "candidates_per_query": problem["candidates_per_query"],
               "queries": len(problem["queries"]), "ground_truth": ground_truth_description(run, folder), "rows": rows}
    write_json(folder / "results_summary.json", summary)
    write_json(folder / "results.json", [{k: v for k, v in row.items() if not k.startswith("per_query")} for row in rows])
    plot_results(rows, folder / "results.png")
    return rows


def ground_truth_description(run: Run, folder: Path) -> dict:
    metadata = read_json(folder / "scores" / "ground-truth-all" / "scores.json")
    solve = metadata.get("hyperparameters", {}).get("preconditioner", {}).get("last_solve", {})
    return {"solver": "conjugate gradient on (GGN + damping I) x = query gradient, GGN averaged over fit.jsonl",
            "parameters": "all tracked linear modules of the blocks (embeddings and LM head excluded)",
            "damping": run.preset.damping, "tolerance": run.preset.tolerance, "max_iterations": run.preset.ground_truth_iterations,
            "fit_documents": run.preset.fit_documents, "iterations": solve.get("iterations"), "converged": solve.get("converged")}
