"""`pretrace demo`: the whole multi-stage pipeline on a toy world that runs in minutes on a laptop CPU.

1. Pre-train a tiny GPT-NeoX on Penn Treebank sentences into which sentences stating real facts
   (country capitals, from `countryinfo`) have been mixed.
2. Fine-tune it with the proximity term on question/answer pairs about *other* countries.
3. Fit EK-FAC factors of both stages (pre-training text; fine-tuning pairs, completion tokens only).
4. Trace held-out questions back to the pre-training sentences and report MRR and recall@10 of
   multi-stage influence against gradient dot product and BM25.
Every stage is cached in the output folder, so re-running continues where it stopped.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from pretrace.bench.facts.metrics import mean_reciprocal_rank, mean_recall_at_k
from pretrace.data.records import read_documents, read_queries
from pretrace.extras import require
from pretrace.stages import File, Folder, StageCache
from pretrace.bench.settings import DemoSettings
from pretrace.storage import output_folder, read_json, write_json, write_jsonl

QUESTION = "question : what is the capital of {country} ? answer :"
STATEMENTS = ("{capital} is the capital of {country} .", "the capital city of {country} is {capital} .")


def _words(name: str) -> str:
    return " ".join(re.findall(r"[a-z]+", name.lower()))


def capital_facts(count: int, seed: int) -> list[tuple[str, str]]:
    """(country, capital) pairs with simple lower-case names, a seeded sample."""
    from pretrace.bench.facts.bundled_facts import bundled_fact_source

    pairs = sorted({(_words(t.subject), _words(t.object)) for t in bundled_fact_source().triples if t.relation == "P36"})
    pairs = [(c, k) for c, k in pairs if c and k and c != k and len(c.split()) <= 2 and len(k.split()) <= 2]
    random.Random(seed).shuffle(pairs)
    return pairs[:count]


WORLD_SETTINGS = ("ptb_sentences", "facts", "query_facts", "fact_repeats", "candidates", "fit_documents", "seed")
RANKED = 100  # each method's ranking depth: MRR counts hits within it
DEMO_MODULES = ("bm25s", "treebank", "countryinfo", "pycountry", "gensim")  # its corpora and the BM25 baseline: pretrace[retrieval,data]
WORLD_FILES = ("pretrain.jsonl", "fit_sample.jsonl", "candidates.jsonl", "finetune.jsonl", "queries.jsonl", "world.json")


def build_world(settings: DemoSettings, folder: Path, cache: StageCache) -> dict:
    """Writes pretrain.jsonl, candidates.jsonl, finetune.jsonl, queries.jsonl and the fact → candidate map."""
    manifest = folder / "world.json"
    key = cache.key("world", **{name: getattr(settings, name) for name in WORLD_SETTINGS})
    if not cache.stale(key, *(folder / name for name in WORLD_FILES)):
        return read_json(manifest)
    from pretrace.data.ptb import ptb_documents

    rng = random.Random(settings.seed)
    facts = capital_facts(settings.facts, settings.seed)
    ptb = ptb_documents("train", limit=settings.ptb_sentences)
    statements = [(i, s.format(country=c, capital=k)) for i, (c, k) in enumerate(facts) for s in STATEMENTS]
    corpus = [d.text for d in ptb] + [text for _, text in statements] * settings.fact_repeats
    rng.shuffle(corpus)
    write_jsonl(folder / "pretrain.jsonl", ({"id": f"pt{i}", "text": t} for i, t in enumerate(corpus)))
    write_jsonl(folder / "fit_sample.jsonl", ({"id": f"pt{i}", "text": t} for i, t in enumerate(corpus[: settings.fit_documents])))
    fillers = rng.sample([d.text for d in ptb], settings.candidates)
    candidates = [text for _, text in statements] + fillers
    evidence = {}
    for index, (fact, _) in enumerate(statements):
        evidence.setdefault(fact, []).append(index)
    write_jsonl(folder / "candidates.jsonl", ({"id": f"c{i}", "text": t} for i, t in enumerate(candidates)))
    pairs = lambda items: ({"id": f"f{i}", "prompt": QUESTION.format(country=c), "completion": f" {k} ."} for i, (c, k) in items)
    held_out = list(enumerate(facts))[: settings.query_facts]
    tuned = list(enumerate(facts))[settings.query_facts :]
    write_jsonl(folder / "finetune.jsonl", pairs(tuned))
    write_jsonl(folder / "queries.jsonl", pairs(held_out))
    world = {"facts": facts, "queries": [i for i, _ in held_out], "evidence": {str(i): evidence[i] for i, _ in held_out}}
    write_json(manifest, world)
    cache.record(key)
    return world


def pretrain_model(settings: DemoSettings, folder: Path, cache: StageCache) -> Path:
    out = folder / "pretrained"
    key = cache.key("pretrain", data=File(folder / "pretrain.jsonl"), epochs=settings.epochs, seed=settings.seed)
    if not cache.stale(key, out):
        return out
    from transformers import GPTNeoXConfig

    from pretrace.data.bpe import train_bpe
    from pretrace.data.ptb import ptb_documents
    from pretrace.training.loop import TrainSettings
    from pretrace.training.pretrain import pretrain

    documents = read_documents(folder / "pretrain.jsonl")
    tokenizer = train_bpe((d.text for d in documents), vocab_size=2000)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           rotary_pct=0.25, max_position_embeddings=128, attention_dropout=0.0, hidden_dropout=0.0)
    train = TrainSettings(lr=3e-3, epochs=settings.epochs, batch_size=32, max_length=64, warmup=0.02, seed=settings.seed)
    pretrain(config, tokenizer, documents, train, validation=ptb_documents("valid", limit=500), out=out)
    cache.record(key)
    return out


def finetune_model(settings: DemoSettings, folder: Path, pretrained: Path, cache: StageCache) -> Path:
    from pretrace.training.finetune import FinetuneSettings, finetune

    out = folder / "finetuned"
    finetuning = FinetuneSettings(model=str(pretrained), data=str(folder / "finetune.jsonl"), out=str(out), alpha=settings.alpha,
                                  lr=1e-3, epochs=30, batch_size=8, max_length=64, warmup=0.05, seed=settings.seed)
    key = cache.key("finetune", model=Folder(pretrained), data=File(folder / "finetune.jsonl"), settings=finetuning)
    if cache.stale(key, out):
        finetune(finetuning)
        cache.record(key)
    return out


def run_demo(settings: DemoSettings) -> dict:
    """Run (or resume) every stage in --out, checked and locked first like every command's output; returns the table."""
    require(*DEMO_MODULES, purpose="pretrace demo (its bundled corpora and the BM25 baseline)")
    with output_folder(settings.out, False, command="demo", resume=True):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict:
    from pretrace.retrieval.bm25 import BM25Index
    from pretrace.scores.io import load_scores
    from pretrace.scores.result import top_indices
    from pretrace.modeling.stage import ModelOptions
    from pretrace.workflows.fit import fit
    from pretrace.workflows.score import Outputs, ScoreSettings, score

    folder = Path(settings.out)
    folder.mkdir(parents=True, exist_ok=True)
    cache = StageCache(folder)
    torch.manual_seed(settings.seed)
    world = build_world(settings, folder, cache)
    pretrained = pretrain_model(settings, folder, cache)
    finetuned = finetune_model(settings, folder, pretrained, cache)
    options = ModelOptions(max_length=64, batch_size=16)
    sample = folder / "fit_sample.jsonl"
    factors = {}
    for model, data, out in ((pretrained, sample, "factors_pretrained"), (finetuned, folder / "finetune.jsonl", "factors_finetuned")):
        factors[out] = cache.key(out, model=Folder(model), data=File(data), options=options)
        if cache.stale(factors[out], folder / out):
            fit(model, data, folder / out, options)
            cache.record(factors[out])
    methods = {  # the curvature method with both stages' factors; the dot product needs none
        "multi-stage EK-FAC": dict(method="ekfac", pretrained_factors=str(folder / "factors_pretrained"),
                                   finetuned_factors=str(folder / "factors_finetuned")),
        "gradient dot product": dict(method="identity"),
    }
    rankings = {}
    for label, extra in methods.items():
        out = folder / f"scores_{extra['method']}"
        scoring = ScoreSettings(queries=str(folder / "queries.jsonl"), train=str(folder / "candidates.jsonl"), out=str(out),
                                pretrained=str(pretrained), finetuned=str(finetuned), outputs=Outputs(top_k=10), **extra)
        key = cache.key(f"scores_{extra['method']}", models=[Folder(pretrained), Folder(finetuned)], factors=list(factors.values()),
                        world=File(folder / "world.json"), settings=scoring, options=options)
        if cache.stale(key, out):
            score(scoring, options)
            cache.record(key)
        tensors, _ = load_scores(out)
        rankings[label] = top_indices(tensors["scores"], min(RANKED, tensors["scores"].shape[1])).tolist()
    candidates = read_documents(folder / "candidates.jsonl")
    queries = [q.prompt + q.completion for q in read_queries(folder / "queries.jsonl")]
    bm25 = BM25Index.build([d.text for d in candidates], show_progress=False)
    rankings["BM25 (question + answer)"] = bm25.search(queries, min(RANKED, len(candidates)))[0].tolist()
    correct = [world["evidence"][str(i)] for i in world["queries"]]
    table = {label: {"mrr": mean_reciprocal_rank(r, correct), "recall@10": mean_recall_at_k(r, correct)} for label, r in rankings.items()}
    write_json(folder / "results.json", table)
    return table
