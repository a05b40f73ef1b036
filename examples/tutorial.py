# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # pretrace tutorial: which pre-training sentences is a fine-tuned model's answer built on?
#
# We build a toy world that runs on a laptop CPU in well under a minute:
#
# 1. **pre-train** a tiny GPT-NeoX on a few dozen sentences, sixteen of which state a capital city;
# 2. **fine-tune** it, with a proximity term, to answer questions about twelve of those countries;
# 3. ask the fine-tuned model about the four countries it was *not* fine-tuned on, and use influence
#    functions to find the pre-training sentence each answer comes from.
#
# Open it as a notebook (`jupytext --to notebook examples/tutorial.py`) or run it as a script
# (`python examples/tutorial.py`). All it writes goes into a fresh temporary folder, or into
# `$PRETRACE_TUTORIAL_DIR` when that variable is set.

# %%
import os
import random
import tempfile
from pathlib import Path

import torch

import pretrace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below needs the network
torch.set_num_threads(1)  # the models are tiny: extra threads only add overhead

WORK = Path(os.environ.get("PRETRACE_TUTORIAL_DIR") or tempfile.mkdtemp(prefix="pretrace-tutorial-"))
WORK.mkdir(parents=True, exist_ok=True)
print("output folder:", WORK)

# %% [markdown]
# ## 1. The toy world
#
# Documents are records with an `id` and a `text`; every score comes back labelled with these ids.
# The pre-training corpus holds
#
# - one **fact** sentence per country: `the capital of norway is oslo .`
# - an **about** sentence for each held-out country that names it but not its capital, a decoy;
# - **filler** sentences about cats, boats and farmers.
#
# Fine-tuning pairs and queries are `prompt`/`completion` records: only the completion's tokens are
# trained on, and a query measures how likely the model finds its completion after the prompt.

# %%
CAPITALS = {
    "france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo",
    "egypt": "cairo", "peru": "lima", "norway": "oslo", "kenya": "nairobi", "greece": "athens",
    "russia": "moscow", "cuba": "havana", "austria": "vienna", "poland": "warsaw", "ireland": "dublin",
    "chile": "santiago",
}
HELD_OUT = ["norway", "peru", "kenya", "greece"]  # asked about, never fine-tuned on

rng = random.Random(0)
words = {"adj": "old small green happy quiet red long cold".split(),
         "noun": "cat dog boat river book song child bird farmer teacher".split(),
         "verb": "sat ran walked looked waited slept".split(), "prep": "on near under behind beside".split()}
filler = set()
while len(filler) < 48:
    pick = {kind: rng.choice(options) for kind, options in words.items()}
    filler.add("the {adj} {noun} {verb} {prep} the {other} .".format(**pick, other=rng.choice(words["noun"])))

documents = [{"id": f"fact-{country}", "text": f"the capital of {country} is {capital} ."} for country, capital in CAPITALS.items()]
documents += [{"id": f"about-{country}", "text": f"many people visit {country} in summer ."} for country in HELD_OUT]
documents += [{"id": f"filler-{i:02d}", "text": text} for i, text in enumerate(sorted(filler))]

QUESTION = "question : what is the capital of {} ? answer :"
finetune_pairs = [{"id": f"ft-{country}", "prompt": QUESTION.format(country), "completion": f" {capital} ."}
                  for country, capital in CAPITALS.items() if country not in HELD_OUT]
questions = [{"id": f"{country}:question", "prompt": QUESTION.format(country), "completion": f" {CAPITALS[country]} ."}
             for country in HELD_OUT]
statements = [{"id": f"{country}:statement", "prompt": f"the capital of {country} is", "completion": f" {CAPITALS[country]} ."}
              for country in HELD_OUT]
print(f"{len(documents)} pre-training documents, {len(finetune_pairs)} fine-tuning pairs")
documents[:3]

# %% [markdown]
# ## 2. Pre-train a tiny model
#
# Any Hugging Face causal LM works with pretrace; here we make our own: a byte-level BPE tokenizer
# fitted to the texts (large enough that every word is one token) and a two-layer GPT-NeoX with a
# hidden size of 64, trained by pretrace's training loop (`pretrace.training.pretrain`).

# %%
from transformers import GPTNeoXConfig

from pretrace.data.bpe import train_bpe
from pretrace.training import TrainSettings, pretrain

MAX_LENGTH = 32  # tokens per sequence; every text here is shorter
texts = [d["text"] for d in documents] + [p["prompt"] + p["completion"] for p in finetune_pairs + questions]
tokenizer = train_bpe(texts, vocab_size=1000, min_frequency=1)
config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, rotary_pct=0.25,
                       max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0)
corpus = [pretrace.Document(d["id"], d["text"]) for d in documents]
pretrained = pretrain(config, tokenizer, corpus, TrainSettings(lr=3e-3, epochs=40, batch_size=8, max_length=MAX_LENGTH, seed=0))


def answer(model, prompt: str) -> str:
    """The model's greedy next word after `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return tokenizer.decode(model(ids).logits[0, -1].argmax()).strip()


print("pre-trained:", {country: answer(pretrained, f"the capital of {country} is") for country in HELD_OUT})

# %% [markdown]
# ## 3. What an influence score means
#
# For a query x (prompt + completion) and a training document z,
#
#     score(z, x) = ∇ log p(completion | prompt)ᵀ · P · ∇ loss(z)
#
# where P is an inverse curvature of the training loss. It estimates **how much more likely the
# completion becomes if z had weighed a little more in training**:
#
# - **positive**: z supports the completion;
# - **negative**: z works against it (training on it more makes the completion less likely);
# - **near zero**: z hardly matters for this query.
#
# Compare scores within one query (a row). Their scale depends on the model and on the query, so
# ranks within a row mean more than a score's absolute size.
#
# ## 4. Fit factors, then score (single-stage)
#
# P comes from **EK-FAC factors**: `pretrace.fit(model, data)` estimates the curvature of the loss on
# `data`, for every tracked module (by default each linear layer inside the transformer blocks). Fit
# a model on the data it was trained on. Without `out=` the factors stay in memory.
#
# **Single-stage** scoring uses one model for queries and documents: `model=` with its `factors=`.
# Here the pre-trained model is asked, in its own words, to complete "the capital of norway is".

# %%
pretrained_factors = pretrace.fit(pretrained, documents, tokenizer=tokenizer, max_length=MAX_LENGTH)
single = pretrace.score(statements, documents, model=pretrained, factors=pretrained_factors, tokenizer=tokenizer,
                        max_length=MAX_LENGTH)
print(tuple(single.scores.shape), "scores: a row per query", single.query_ids, "and a column per document")

# %% [markdown]
# ## 5. Read the top documents
#
# `result.top(k)` maps each query id to its k best documents as `(document id, score)`, best first.

# %%
text_of = {d["id"]: d["text"] for d in documents}


def show_top(result, k=3):
    for query_id, ranked in result.top(k).items():
        print(query_id)
        for document_id, score in ranked:
            print(f"    {score:+10.3g}  {document_id:13s} {text_of[document_id]}")


show_top(single)

# %% [markdown]
# ## 6. Fine-tune with a proximity term
#
# Now teach the model a new format, question → answer, on twelve countries. Multi-stage influence
# assumes fine-tuning minimised the task loss **plus α/2 ‖θ − θ_pt‖²**, a spring pulling the weights
# back towards the pre-trained ones θ_pt. `pretrace.finetune` adds that term and returns a fine-tuned
# *copy* (`pretrained` stays as it was); the α it used is recorded on the returned model.
#
# The fine-tuned model never saw the four held-out questions, yet it usually answers them from what
# pre-training stated (a model this small gets one wrong now and then). A query measures the
# completion *we* give it, whatever the model would say itself.

# %%
ALPHA = 0.01
finetuned = pretrace.finetune(pretrained, finetune_pairs, alpha=ALPHA, tokenizer=tokenizer,
                              lr=1e-3, epochs=30, batch_size=8, max_length=MAX_LENGTH, seed=0)
print("recorded α:", finetuned.pretrace_finetune["alpha"])
print("fine-tuned:", {country: answer(finetuned, QUESTION.format(country)) for country in HELD_OUT})

# %% [markdown]
# ## 7. Multi-stage versus single-stage
#
# Which pre-training sentence does the fine-tuned model's answer to "what is the capital of norway ?"
# rest on? Single-stage scoring on the pre-trained model does not see the question format, which
# only fine-tuning taught, so the fact sentence usually ranks far down:

# %%
def fact_ranks(result, kind):
    """Where each held-out country's fact sentence ranks for that country's query (1 = top)."""
    ranks = result.to_pandas().set_index(["query_id", "document_id"])["rank"]
    return {country: int(ranks[(f"{country}:{kind}", f"fact-{country}")]) for country in HELD_OUT}


naive = pretrace.score(questions, documents, model=pretrained, factors=pretrained_factors, tokenizer=tokenizer, max_length=MAX_LENGTH)
print("single-stage, questions on the pre-trained model:", fact_ranks(naive, "question"))

# %% [markdown]
# **Multi-stage** influence, the method pretrace is built around, takes query gradients on the
# fine-tuned model and document gradients on the pre-trained one, and chains the two curvatures:
#
#     P = α (H_ft + α I)⁻¹ · H_pt⁻¹
#
# H_pt is fitted on pre-training text with the pre-trained model, H_ft on the fine-tuning pairs with
# the fine-tuned model. **α** is fine-tuning's proximity strength: a large α keeps the fine-tuned
# model near θ_pt, and P tends to plain H_pt⁻¹; a small α lets fine-tuning move further, and H_ft
# decides how much of a change to the pre-trained weights survives into the fine-tuned model.
#
# Pass `pretrained=`, `finetuned=` and both stages' factors. α is taken from the model
# `pretrace.finetune` returned (from `pretrace_finetune.json` for a model folder; otherwise give
# `alpha=`). With `out=` the result is also written to a folder: the scores, a manifest, and
# `top_k.jsonl` with each query's best documents and their per-token contributions.

# %%
finetuned_factors = pretrace.fit(finetuned, finetune_pairs, tokenizer=tokenizer, max_length=MAX_LENGTH)
SCORES = WORK / "scores-multistage"
multi = pretrace.score(questions, documents, pretrained=pretrained, finetuned=finetuned,
                       pretrained_factors=pretrained_factors, finetuned_factors=finetuned_factors,
                       tokenizer=tokenizer, max_length=MAX_LENGTH, out=SCORES)
print("multi-stage:", fact_ranks(multi, "question"))
show_top(multi)
print(sorted(path.name for path in SCORES.iterdir()))

# %% [markdown]
# ## 8. As a pandas table
#
# `to_pandas()` is the long form: one row per (query, document) with its `score` and `rank`
# (1 = best), sorted by query then rank, ready for filters, joins and group-bys.
# `to_pandas("wide")` is the score matrix itself, queries as rows and documents as columns.

# %%
table = multi.to_pandas()
table.groupby("query_id").tail(2)  # each query's two lowest scores

# %% [markdown]
# The most negative documents are typically *other* countries' facts: they train the slot after
# "the capital of ... is" towards a different city, against the queried answer.

# %%
wide = multi.to_pandas("wide")
wide[[f"fact-{country}" for country in HELD_OUT] + [f"about-{country}" for country in HELD_OUT]]

# %% [markdown]
# ## 9. Load a score folder back
#
# `pretrace.load_scores(folder)` reads what `out=` (or the `pretrace score` command) wrote, checked
# against its manifest, into the same kind of result.

# %%
loaded = pretrace.load_scores(SCORES)
loaded.top(1)

# %% [markdown]
# ## 10. An HTML report
#
# From a shell, `pretrace report FOLDER` turns a score folder into a self-contained `report.html`
# (plus plots): each query with its top documents, their tokens shaded by how much each contributed.

# %%
print(f"pretrace report {SCORES}")

# %% [markdown]
# ## 11. Checks
#
# These hold for this toy world; CI runs this file as a script, so they catch a broken pipeline.

# %%
for result in (single, naive, multi, loaded):
    assert result.scores.shape == (len(HELD_OUT), len(documents))
    assert torch.isfinite(result.scores).all(), "every score is finite"
# The sentence stating a fact is among the top 3 documents for that fact, in both settings.
assert all(rank <= 3 for rank in fact_ranks(single, "statement").values()), fact_ranks(single, "statement")
assert all(rank <= 3 for rank in fact_ranks(multi, "question").values()), fact_ranks(multi, "question")
# Multi-stage finds the facts behind the questions at least as well as single-stage on the pre-trained model.
assert sum(fact_ranks(multi, "question").values()) <= sum(fact_ranks(naive, "question").values())
for query_id, ranked in multi.top(1).items():
    assert ranked[0][1] > 0, f"{query_id}: the best document supports the answer"
# load_scores round-trips the folder.
assert loaded.query_ids == multi.query_ids and loaded.document_ids == multi.document_ids
assert torch.allclose(loaded.scores, multi.scores.double(), rtol=1e-6, atol=0)
assert {q: [d for d, _ in top] for q, top in loaded.top(3).items()} == {q: [d for d, _ in top] for q, top in multi.top(3).items()}
# The long table has one row per (query, document), ranked 1..N within each query; the wide one is the matrix.
assert len(table) == len(HELD_OUT) * len(documents)
assert all(sorted(ranks) == list(range(1, len(documents) + 1)) for _, ranks in table.groupby("query_id")["rank"])
assert torch.allclose(torch.tensor(wide.to_numpy()), multi.scores.double())
print("all checks passed")
