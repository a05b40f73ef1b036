"""Does multi-stage influence predict what retraining *both* stages does on a non-convex network? A multi-stage LDS.

A toy GPT-NeoX (every parameter trained) is pre-trained from scratch on `kept` documents plus a random half of a
`pool` of documents, `subsets` times, then proximally fine-tuned from each pre-trained model at every α; each
query's fine-tuned completion loss is measured. A method's prediction of a subset's effect is the sum of its
scores over the subset's documents, and its LDS per query is the Spearman correlation over subsets of that
prediction with the measured loss decrease (`pretrace.bench.lds`, the library's sign convention).

The data are random walks over topic-specific transition matrices; fine-tuning teaches a rule the documents never
state (each completion token is a fixed permutation of the one before), and the queries test the rule on held-out
prompts (`pretrace.bench.retraining.markov_corpus`). Pre-training minimises the mean document loss plus
w/2‖θ‖², fine-tuning the mean completion loss plus α/2‖θ − θ_pt‖², full batch, so every damping in the table is
the objective's own (w for H_pt, α for H_ft): nothing is tuned, on the reported queries or elsewhere.

Every method is scored through `pretrace.fit` and `pretrace.score` on the main models (pre-trained on every
document, from --seed); beside them, the formula itself with the exact damped Gauss-Newton matrices (dense solves:
the toy has a few thousand tracked parameters), which separates the formula's error from EK-FAC's.

The measured losses average --seeds-per-subset retrainings of each subset (seeds from --seed on). The retraining
noise is measured by retraining the same subsets from as many further seeds: the LDS of their average against the
measured one is the ceiling a method can reach. Each retrained subset, model,
factor folder, dense curvature and score folder is a cached stage, so a killed run resumes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pretrace.data.records import Query
from pretrace.stages import StageCache, content_digest
from pretrace.bench.settings import MultiStageLDSSettings
from pretrace.storage import output_folder, read_json, write_json, write_jsonl


@dataclass
class Run:
    settings: MultiStageLDSSettings
    folder: Path
    cache: StageCache = field(init=False)
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.cache = StageCache(self.folder)

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 2)


# -- the world: corpus, tokenizer, model, the two training stages ------------------------------------

def world(settings: MultiStageLDSSettings):
    """(documents, pairs, queries, tokenizer): the pool first, then the kept documents."""
    from pretrace.bench.retraining import RetrainingSettings, markov_corpus, word_tokenizer

    corpus = RetrainingSettings(documents=settings.pool + settings.kept, pairs=settings.pairs, queries=settings.queries, seed=settings.seed)
    documents, pairs, queries = markov_corpus(corpus)
    tokenizer = word_tokenizer([d.text for d in documents] + [q.prompt + q.completion for q in pairs + queries])
    return documents, pairs, queries, tokenizer


def model_config(settings: MultiStageLDSSettings, vocabulary: int):
    from transformers import GPTNeoXConfig

    h = settings.hidden_size
    return GPTNeoXConfig(vocab_size=vocabulary, hidden_size=h, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * h,
                         rotary_pct=0.5, max_position_embeddings=64, tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)


def _full_batch(settings: MultiStageLDSSettings, steps: int, items: int, seed: int):
    from pretrace.training.loop import TrainSettings

    return TrainSettings(lr=settings.lr, epochs=steps, batch_size=items, max_length=64, warmup=0.05, grad_clip=0.0, seed=seed, device="cpu")


def pretrain(settings: MultiStageLDSSettings, tokenizer, documents, seed: int) -> torch.nn.Module:
    """θ_pt = argmin mean document loss + w/2‖θ‖², from a seeded initialisation (float64, every parameter)."""
    from pretrace.data.batching import encode_documents, pad_token_id
    from pretrace.training.loop import train
    from pretrace.training.pretrain import build_model

    model = build_model(model_config(settings, len(tokenizer)), tokenizer, seed=seed, dtype="float64")
    items = list(encode_documents(tokenizer, documents, 64))
    decay = lambda m: 0.5 * settings.weight_decay * sum(p.square().sum() for p in m.parameters())  # noqa: E731
    train(model, items, _full_batch(settings, settings.pretrain_steps, len(items), seed), pad_token_id(tokenizer),
          normalisation="sequence", regulariser=decay, dropout=False, progress=False)
    return model.eval()


def finetune(settings: MultiStageLDSSettings, pretrained: torch.nn.Module, tokenizer, pairs, alpha: float, seed: int) -> torch.nn.Module:
    """θ_ft = argmin mean completion loss + α/2‖θ − θ_pt‖², started at θ_pt (a copy: θ_pt stays)."""
    from pretrace.training.finetune import finetune_model

    model = copy.deepcopy(pretrained)
    finetune_model(model, tokenizer, pairs, _full_batch(settings, settings.finetune_steps, len(pairs), seed), alpha, dropout=False, progress=False)
    return model.eval()


# -- stage 1: the main models, their factors and every method's scores --------------------------------

def stage_models(run: Run, documents, pairs, tokenizer) -> dict[str, Path]:
    """`pt` and `ft-<α>` model folders: the main models every method scores with."""
    s, folder = run.settings, run.folder / "models"
    names = ["pt"] + [f"ft-{alpha:g}" for alpha in s.alpha_values]
    key = run.cache.key("main models", settings=_training(s))
    paths = {name: folder / name for name in names}
    if run.cache.stale(key, folder):
        started = time.perf_counter()
        pretrained = pretrain(s, tokenizer, documents, s.seed)
        models = {"pt": pretrained, **{f"ft-{alpha:g}": finetune(s, pretrained, tokenizer, pairs, alpha, s.seed) for alpha in s.alpha_values}}
        for name, model in models.items():
            model.save_pretrained(paths[name])
            tokenizer.save_pretrained(paths[name])
        run.timed("main models", started)
        run.cache.record(key)
    return paths


def _training(s: MultiStageLDSSettings) -> dict:
    """The settings the trained models depend on (not the methods', nor how many subsets and seeds: each retrained
    subset and seed is one on its own)."""
    return {k: v for k, v in asdict(s).items() if k not in ("out", "subsets", "seeds_per_subset", "refine_iterations", "projection_dim", "threads")}


def models_digest(run: Run) -> str:
    return run.cache.key("main models", settings=_training(run.settings)).digest


def model_options():
    from pretrace.modeling.stage import ModelOptions

    return ModelOptions(dtype="float64", device="cpu", batch_size=64, max_length=64)


def stage_factors(run: Run, models: dict[str, Path]) -> dict[str, Path]:
    """EK-FAC factors: `pt` on the pre-training documents, `ft-<α>` on the fine-tuning pairs and `ft-<α>-docs` on the
    documents at θ_ft (the fine-tuned-only ablation's curvature)."""
    from pretrace.curvature import FitSettings
    from pretrace.workflows.fit import fit

    jobs = {"pt": (models["pt"], "documents.jsonl")}
    for alpha in run.settings.alpha_values:
        jobs[f"ft-{alpha:g}"] = (models[f"ft-{alpha:g}"], "pairs.jsonl")
        jobs[f"ft-{alpha:g}-docs"] = (models[f"ft-{alpha:g}"], "documents.jsonl")
    out = {}
    for name, (model, data) in jobs.items():
        out[name] = run.folder / "factors" / name
        key = run.cache.key(f"factors {name}", models=models_digest(run), data=data)
        if run.cache.stale(key, out[name]):
            started = time.perf_counter()
            fit(model, run.folder / data, out[name], model_options(), FitSettings(fisher="true", factor_dtype="float64"), progress=False)
            run.timed("factors", started)
            run.cache.record(key)
    return out


def method_settings(run: Run, models: dict[str, Path], factors: dict[str, Path], alpha: float) -> dict[str, dict]:
    """Each row's `pretrace score` settings at α (the pre-trained-only rows do not depend on it)."""
    from pretrace.methods.config import EKFAC, KFAC, TRAK, Damping, GradientDot, RefinedEKFAC

    s, tag = run.settings, f"{alpha:g}"
    w = Damping(absolute=s.weight_decay)
    docs, pairs = str(run.folder / "documents.jsonl"), str(run.folder / "pairs.jsonl")
    multi = {"pretrained": str(models["pt"]), "finetuned": str(models[f"ft-{tag}"])}
    with_factors = {**multi, "alpha": alpha, "pretrained_factors": str(factors["pt"]), "finetuned_factors": str(factors[f"ft-{tag}"])}
    pt_only = {"model": str(models["pt"]), "factors": str(factors["pt"]), "damping": w}
    refined = RefinedEKFAC(iterations=s.refine_iterations, tolerance=1e-12, fit_data=docs, finetuned_fit_data=pairs)
    return {
        "multi-stage EK-FAC": {**with_factors, "method": EKFAC(), "damping": w},
        "multi-stage K-FAC": {**with_factors, "method": KFAC(), "damping": w},
        f"multi-stage EK-FAC-CG ({s.refine_iterations} it.)": {**with_factors, "method": refined, "damping": w},
        "pre-trained-only EK-FAC": {**pt_only, "method": EKFAC()},
        f"pre-trained-only EK-FAC-CG ({s.refine_iterations} it.)": {**pt_only, "method": RefinedEKFAC(iterations=s.refine_iterations, tolerance=1e-12, fit_data=docs)},
        "fine-tuned-only EK-FAC": {"model": str(models[f"ft-{tag}"]), "factors": str(factors[f"ft-{tag}-docs"]), "method": EKFAC(), "damping": w},
        "gradient dot product": {**multi, "method": GradientDot()},
        "TRAK (one model per stage)": {**multi, "method": TRAK(projection_dim=s.projection_dim, projection_seed=s.seed)},
    }


def stage_scores(run: Run, name: str, settings: dict, alpha: float | None, upstream: dict[str, str]) -> torch.Tensor:
    """`[Q, pool]` scores of one row (cached as a `pretrace score` folder); `upstream`: the digests of the stages it reads."""
    import warnings

    from pretrace.scores.io import load_scores
    from pretrace.workflows.score import Outputs, ScoreSettings, score

    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") + ("" if alpha is None else f"-alpha={alpha:g}")
    out = run.folder / "scores" / slug
    key = run.cache.key(f"scores {slug}", upstream=upstream, settings={k: repr(v) for k, v in settings.items()})
    if run.cache.stale(key, out):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="CG: ")  # ekfac-cg stops at its iteration budget, by design
            score(ScoreSettings(queries=str(run.folder / "queries.jsonl"), train=str(run.folder / "pool.jsonl"), out=str(out),
                                outputs=Outputs(explain=False), **settings), model_options())
        run.timed(f"score {name}", started)
        run.cache.record(key)
    return load_scores(out)[0]["scores"].double()


# -- the exact formula: dense damped Gauss-Newton matrices (the toy's few thousand parameters allow them) -----

def stage_dense_curvature(run: Run, name: str, model: Path, data: str, upstream: str) -> torch.Tensor:
    """The exact Gauss-Newton `[P, P]` of `model`'s mean loss over `data` (tracked parameters), cached."""
    from pretrace.baselines.curvature_products import CurvatureProducts
    from pretrace.baselines.exact import dense_curvature
    from pretrace.modeling.stage import load_stage
    from pretrace.storage import read_tensors, write_tensors

    out = run.folder / "dense" / f"{name}.safetensors"
    key = run.cache.key(f"dense {name}", models=upstream, data=data)
    if run.cache.stale(key, out):
        started = time.perf_counter()
        stage = load_stage(model, model_options())
        products = CurvatureProducts(stage.model, stage.tracked, list(stage.fitting_batches(run.folder / data)()), "ggn")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(out, {"curvature": dense_curvature(products)})
        run.timed("dense curvatures", started)
        run.cache.record(key)
    return read_tensors(out)["curvature"].double()


def flat_gradients(model: Path, records) -> torch.Tensor:
    """`[R, P]` gradients of each record's measurement (a text-only record: its whole text's loss, as a scored document)."""
    from pretrace.baselines.curvature_products import ParameterLayout
    from pretrace.modeling.stage import load_stage
    from pretrace.scores.pairwise import query_gradients

    stage = load_stage(model, model_options())
    _, grads = query_gradients(stage.model, stage.tracked, stage.query_batches(records))
    return ParameterLayout(stage.tracked).flatten(grads).double()


def exact_multistage(h_pt: torch.Tensor, h_ft: torch.Tensor, queries: torch.Tensor, documents: torch.Tensor, alpha: float, w: float) -> torch.Tensor:
    """`[Q, N]` α ∇m(x)ᵀ (H_ft + αI)⁻¹ (H_pt + wI)⁻¹ ∇ℓ(z) by dense solves."""
    eye = torch.eye(len(h_pt), dtype=h_pt.dtype)
    return alpha * queries @ torch.linalg.solve(h_ft + alpha * eye, torch.linalg.solve(h_pt + w * eye, documents.T))


# -- stage 2: the retrained models ----------------------------------------------------------------------

def stage_retraining(run: Run, documents, pairs, queries, tokenizer, masks: torch.Tensor, seed: int) -> torch.Tensor:
    """`[K, len(alphas), Q]` fine-tuned query losses of the models retrained (from `seed`) on each subset."""
    from pretrace.bench.lds import measure_subsets
    from pretrace.bench.quality_vs_cost import query_losses

    s = run.settings
    pool, kept = documents[: s.pool], documents[s.pool:]

    def retrain_and_measure(members: list[int]) -> list[float]:
        started = time.perf_counter()
        pretrained = pretrain(s, tokenizer, kept + [pool[i] for i in members], seed)
        losses = [loss for alpha in s.alpha_values for loss in query_losses(finetune(s, pretrained, tokenizer, pairs, alpha, seed), tokenizer, queries, 64)]
        run.timed(f"retraining seed {seed}", started)
        return losses

    losses = measure_subsets(run.folder / f"retrained-seed-{seed}", masks, retrain_and_measure, identity={"training": _training(s), "seed": seed},
                             progress=False)
    return losses.view(len(masks), len(s.alpha_values), len(queries))


# -- stage 3: the spectrum of H_ft against α, and the table --------------------------------------------

def spectrum_summary(eigenvalues: torch.Tensor, alphas) -> dict:
    quantiles = torch.quantile(eigenvalues, torch.tensor([0.5, 0.9, 0.99], dtype=eigenvalues.dtype)).tolist()
    return {"parameters": len(eigenvalues), "largest": float(eigenvalues[-1]), "median": quantiles[0], "q90": quantiles[1], "q99": quantiles[2],
            "above": {f"{alpha:g}": int((eigenvalues > alpha).sum()) for alpha in alphas}}


def summarise(lds: dict[str, list[float]], reference: str) -> dict:
    """Per row: mean LDS over queries with its bootstrap interval; each row's paired difference row − `reference`
    over the same queries (Holm-corrected over the rows)."""
    from pretrace.bench.facts.stats import holm, mean_interval, paired_difference

    rows = {name: mean_interval(values) for name, values in lds.items()}
    differences = {name: paired_difference(values, lds[reference]) for name, values in lds.items() if name not in (reference, "noise ceiling")}
    holm(list(differences.values()))
    return {"rows": rows, "reference": reference, "differences": differences}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Multi-stage LDS ({s['subsets']} random halves of {s['pool']} documents, {s['kept']} always kept, {s['queries']} queries)", ""]
    for alpha, table in results["alphas"].items():
        spec = results["spectrum_ft"][alpha]
        lines += [f"## α = {alpha}: H_ft has {spec['above'][alpha]} of {spec['parameters']} eigenvalues above α "
                  f"(largest {spec['largest']:.3g}, median {spec['median']:.3g})", "",
                  f"| method | LDS (95% interval) | method − {table['reference']} (paired, 95% interval) |", "| --- | --- | --- |"]
        for name, row in table["rows"].items():
            diff = table["differences"].get(name)
            text = "—" if diff is None else f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]{' *' if diff['significant'] else ''}"
            lines.append(f"| {name} | {row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}] | {text} |")
        lines.append("")
    lines.append("`*`: the paired difference is significant after Holm's correction over the rows of its α.")
    return "\n".join(lines) + "\n"


def run_multistage_lds(settings: MultiStageLDSSettings) -> dict:
    """Run (or resume) every stage in --out; returns what `results.json` holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with output_folder(settings.out, False, command="bench multistage-lds", resume=True):
            return _run(settings)
    finally:
        torch.set_num_threads(threads)


def _run(settings: MultiStageLDSSettings) -> dict:
    from pretrace.bench.lds import linear_datamodeling_scores, subset_masks
    from pretrace.metrics import spearman

    started = time.perf_counter()
    folder = Path(settings.out)
    run = Run(settings, folder, timings=read_json(folder / "timings.json") if (folder / "timings.json").is_file() else {})
    documents, pairs, queries, tokenizer = world(settings)
    write_jsonl(folder / "documents.jsonl", ({"id": d.id, "text": d.text} for d in documents))
    write_jsonl(folder / "pool.jsonl", ({"id": d.id, "text": d.text} for d in documents[: settings.pool]))
    write_jsonl(folder / "pairs.jsonl", ({"prompt": q.prompt, "completion": q.completion} for q in pairs))
    write_jsonl(folder / "queries.jsonl", ({"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries))
    print("[multistage-lds] 1. main models, factors, scores", flush=True)
    models = stage_models(run, documents, pairs, tokenizer)
    factors = stage_factors(run, models)
    upstream = {"models": models_digest(run), **{name: content_digest(path) for name, path in factors.items()}}
    scores = {alpha: {name: stage_scores(run, name, row, None if name.startswith("pre-trained-only") else alpha, upstream)
                      for name, row in method_settings(run, models, factors, alpha).items()} for alpha in settings.alpha_values}
    dense = {"pt": stage_dense_curvature(run, "pt", models["pt"], "documents.jsonl", upstream["models"]),
             **{alpha: stage_dense_curvature(run, f"ft-{alpha:g}", models[f"ft-{alpha:g}"], "pairs.jsonl", upstream["models"])
                for alpha in settings.alpha_values}}
    pool_gradients = flat_gradients(models["pt"], [Query(d.id, d.text) for d in documents[: settings.pool]])
    for alpha in settings.alpha_values:
        exact = exact_multistage(dense["pt"], dense[alpha], flat_gradients(models[f"ft-{alpha:g}"], queries), pool_gradients, alpha, settings.weight_decay)
        scores[alpha] = {**scores[alpha], "multi-stage exact GGN (dense solves)": exact}
    masks = subset_masks(settings.pool, settings.subsets, settings.seed)
    k = settings.seeds_per_subset
    seeds = [settings.seed + r for r in range(2 * k)]
    print(f"[multistage-lds] 2. retrain both stages on {settings.subsets} random halves, seeds {seeds}", flush=True)
    runs = [stage_retraining(run, documents, pairs, queries, tokenizer, masks, seed) for seed in seeds]
    losses = [torch.stack(runs[:k]).mean(0), torch.stack(runs[k:]).mean(0)]  # measured (the main models' seed first), and the repeat
    print("[multistage-lds] 3. spectra and the table", flush=True)
    tables, spectra = {}, {}
    for a, alpha in enumerate(settings.alpha_values):
        measured, repeat = losses[0][:, a], losses[1][:, a]
        lds = {name: linear_datamodeling_scores(rows, masks, measured) for name, rows in scores[alpha].items()}
        lds["noise ceiling"] = [spearman(-repeat[:, q], -measured[:, q]) for q in range(measured.shape[1])]
        tables[f"{alpha:g}"] = summarise(lds, "multi-stage EK-FAC") | {"per_query": lds}
        spectra[f"{alpha:g}"] = spectrum_summary(torch.linalg.eigvalsh(dense[alpha]), settings.alpha_values)
    run.timings["run wall"] = round(time.perf_counter() - started, 2)  # this invocation's: the stages' own times add up
    results = {"settings": asdict(settings), "alphas": tables, "spectrum_ft": spectra,
               "spectrum_pt": spectrum_summary(torch.linalg.eigvalsh(dense["pt"]), [settings.weight_decay]),
               "measured_loss_std_over_subsets": {f"{alpha:g}": losses[0][:, a].std(0).mean().item() for a, alpha in enumerate(settings.alpha_values)},
               "timings": run.timings, "stages": run.cache.statuses}
    write_json(folder / "timings.json", run.timings)
    write_json(folder / "results.json", results)
    (folder / "results.md").write_text(markdown(results), encoding="utf-8")
    return results
