"""Two gloo processes on the CPU give the single-process factors, scores and fine-tuned model; a killed fit resumes.

The torchrun tests drive the real CLI (`torchrun --nproc-per-node 2 -m pretrace fit|score|finetune`); the
resume test spawns the ranks itself so that it can kill one of them part-way through the second pass. Also
here: the other memory and placement settings (scores on disk, queries split over ranks, factors applied
on the CPU or sharded by module, half-precision factors, device_map models).
"""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from pretrace.config import from_flags
from pretrace.curvature import EKFAC, KFAC, Chain, FitSettings, Factors, PlacedPreconditioner, Preconditioner, Scaled, fit_factors
from pretrace.data.batching import collate, encode_queries
from pretrace.data.records import read_queries
from pretrace.errors import PretraceError
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.modeling.modules import select_modules
from pretrace.scores.io import load_scores
from pretrace.scores.columns import ScoreColumns, transpose_to_npy
from pretrace.scores.pairwise import query_gradients, score_documents
from pretrace.scores.plan import ScoringPlan, query_order
from pretrace.training import FinetuneSettings, finetune, read_finetune_record, sequence_losses
from pretrace.modeling.stage import ModelOptions, Stage, load_stage
from pretrace.storage import read_sealed
from pretrace.storage import checkpoint_folder
from pretrace.workflows.fit import fit
from pretrace.workflows.score import ScoreSettings, score
from tiny import WORDS, save_tiny_model

BATCH_SIZE = 4
DOCUMENTS = 35  # 9 batches: rank 0 gets 5, rank 1 gets 4, the last batch holds 3 documents
COMMON = ["--batch-size", str(BATCH_SIZE), "--device", "cpu"]
QUERIES = [
    {"id": "q0", "prompt": "paris is the capital of", "completion": " france ."},
    {"id": "q1", "prompt": "the cat sat", "completion": " on the mat ."},
    {"id": "q2", "prompt": "birds can fly and", "completion": " fish can swim ."},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A float32 tiny model, documents, queries and the single-process factors and scores."""
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_model(root / "model", dtype=torch.float32)
    rng = random.Random(0)
    docs = _write_jsonl(root / "docs.jsonl", (
        {"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))} for i in range(DOCUMENTS)
    ))
    queries = _write_jsonl(root / "queries.jsonl", QUERIES)
    options = ModelOptions(batch_size=BATCH_SIZE, device="cpu")
    fit(model, docs, root / "factors", options, FitSettings(checkpoint_every=1), progress=False)
    score(from_flags(ScoreSettings, queries=str(queries), train=str(docs), out=str(root / "scores"), model=str(model),
                        factors=str(root / "factors"), per_module=True), options)
    return root


def _max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))


def _assert_same_factors(folder: Path, reference: Path) -> None:
    mine, ref = Factors.load(folder), Factors.load(reference)
    assert mine.metadata["documents"] == ref.metadata["documents"] == DOCUMENTS
    assert mine.metadata["tokens"] == ref.metadata["tokens"]
    assert mine.module_names() == ref.module_names()
    for name in ref.modules:
        for field in ("activation_covariance", "gradient_covariance", "activation_eigenvalues", "gradient_eigenvalues", "lambda_"):
            difference = _max_relative_difference(getattr(ref.modules[name], field), getattr(mine.modules[name], field))
            assert difference < 1e-5, (name, field, difference)


def _torchrun(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pretrace", *arguments]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow  # the resume test below covers a 2-process fit through the same workflow
def test_torchrun_fit_equals_single_process(workspace):
    fitted = _torchrun("fit", "--model", "model", "--data", "docs.jsonl", "--out", "factors-2", *COMMON, cwd=workspace)
    _assert_same_factors(workspace / "factors-2", workspace / "factors")
    assert fitted.stdout.count("factors for") == 1  # only rank 0 prints
    assert not checkpoint_folder(workspace / "factors-2").exists()


def _top_documents(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "top_k.jsonl").read_text().splitlines()]
    return [document for row in rows for document in row["documents"]]


def _assert_same_scores(folder: Path, reference: Path, explained: bool = True) -> None:
    (ref_tensors, ref_meta), (tensors, meta) = load_scores(reference), load_scores(folder)
    assert meta["document_ids"] == ref_meta["document_ids"] == [f"d{i}" for i in range(DOCUMENTS)]
    assert meta["query_ids"] == ref_meta["query_ids"] == [q["id"] for q in QUERIES]
    for key in ("scores", "per_module"):
        assert tensors[key].shape == ref_tensors[key].shape
        assert _max_relative_difference(ref_tensors[key], tensors[key]) < 1e-5, key
    top, ref_top = _top_documents(folder), _top_documents(reference)
    assert [d["id"] for d in top] == [d["id"] for d in ref_top]
    for document, reference_document in zip(top, ref_top):  # explanations: the top documents rescored in RAM, sharded too
        assert document["tokens"] == reference_document["tokens"]
        for key in ("token_scores", "module_scores"):  # float32, sums added in another order
            assert _max_relative_difference(torch.tensor(_values(reference_document[key])), torch.tensor(_values(document[key]))) < 1e-5, key


def test_torchrun_score_equals_single_process(workspace):
    """Scores streamed to disk by both ranks, and explanations gathered in RAM, match a single process; each
    rank applies only its own modules' factors and broadcasts the preconditioned gradients."""
    root = workspace
    scored = _torchrun("score", "--model", "model", "--factors", "factors", "--queries", "queries.jsonl", "--train", "docs.jsonl",
                       "--out", "scores-2", "--per-module", "--scores-on-disk", "--shard-factors", *COMMON, cwd=root)
    assert scored.stdout.count("scores [") == 1  # only rank 0 prints
    _assert_same_scores(root / "scores-2", root / "scores")
    hyperparameters = load_scores(root / "scores-2")[1]["hyperparameters"]
    placement = hyperparameters["preconditioner"]
    assert placement["factors_sharded_by_module"] and placement["factors_device"] is None  # on the CPU already: no device to keep them on
    assert hyperparameters["query_route"] == "eigenbasis"  # as with the factors beside the model: placing them never changes the route


def test_torchrun_score_split_by_queries_equals_single_process(workspace):
    """Rank 0 scores q0 and q2, rank 1 q1, each against every document: scores streamed to per-rank files and
    explanations (per-token contributions) gathered in RAM come back in query order."""
    _torchrun("score", "--model", "model", "--factors", "factors", "--queries", "queries.jsonl", "--train", "docs.jsonl",
              "--out", "scores-queries", "--shard", "queries", "--per-module", "--scores-on-disk", *COMMON, cwd=workspace)
    _assert_same_scores(workspace / "scores-queries", workspace / "scores")
    assert not (workspace / ".scores-queries.scores").exists()


FINETUNE_PAIRS = [{"id": f"f{i}", "prompt": f"{a} is the capital of", "completion": f" {b} ."} for i, (a, b) in enumerate(
    [("paris", "france"), ("berlin", "germany"), ("rome", "italy"), ("madrid", "spain"), ("cat", "mat"),
     ("bird", "fish"), ("the", "sat"), ("fly", "swim"), ("on", "and")])]  # 9 pairs, batches of 4: rank 1 gets none of the last


def test_torchrun_finetune_equals_single_process(tmp_path):
    """Each rank takes half of every batch of 4 and the gradients are all-reduced: the same model as one process."""
    model = save_tiny_model(tmp_path / "model", dtype=torch.float64)
    data = _write_jsonl(tmp_path / "pairs.jsonl", FINETUNE_PAIRS)
    common = ["--alpha", "0.5", "--lr", "0.01", "--epochs", "2", "--batch-size", "4", "--dtype", "float64", "--device", "cpu"]
    done = _torchrun("finetune", "--model", "model", "--data", "pairs.jsonl", "--out", "tuned-2", *common, cwd=tmp_path)
    assert done.stdout.count("fine-tuned on") == 1  # only rank 0 prints
    finetune(FinetuneSettings(model=str(model), data=str(data), out=str(tmp_path / "tuned"), alpha=0.5, lr=0.01, epochs=2,
                              batch_size=4, dtype="float64", device="cpu"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pairs.jsonl", "tuned", "tuned-2"]  # no temporary folder left
    mine, ref = read_finetune_record(tmp_path / "tuned-2"), read_finetune_record(tmp_path / "tuned")
    assert mine["steps"] == ref["steps"] == 6
    assert math.isclose(mine["final_train_loss"], ref["final_train_loss"], rel_tol=1e-9)
    start, tuned, reference = (load_model(tmp_path / name, "float64", "cpu") for name in ("model", "tuned-2", "tuned"))
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(reference.parameters(), start.parameters()))
    assert moved > 1e-3  # fine-tuning did change the weights
    for (name, p), q in zip(reference.named_parameters(), tuned.parameters()):
        if not name.endswith("query_key_value.bias"):  # key biases get 0 gradient plus rounding noise, which Adam turns into steps
            assert _max_relative_difference(p.detach(), q.detach()) < 1e-6, name
    batch = collate(list(encode_queries(load_tokenizer(model), read_queries(data), 64)), 0)
    with torch.no_grad():
        torch.testing.assert_close(sequence_losses(tuned, batch), sequence_losses(reference, batch), rtol=1e-8, atol=0)


def test_query_order_interleaves_rank_rows(tmp_path):
    """Rank r holds queries r, r + world, ...: their rows, concatenated in rank order, are put back in query order."""
    assert query_order([3, 2]) == [0, 3, 1, 4, 2]
    assert query_order([1, 0]) == [0]
    rows = [np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * r for r in range(2)]  # [N=2, Q_r=3]
    sources = []
    for r, part in enumerate(rows):
        path = tmp_path / f"rank{r}.columns"
        path.write_bytes(part.tobytes())
        sources.append((path, (3,)))
    transpose_to_npy(sources, tmp_path / "merged.npy", total=2, chunk_bytes=8)
    merged = np.load(tmp_path / "merged.npy")
    queries = np.concatenate(rows, axis=1)[:, query_order([3, 3])]
    np.testing.assert_array_equal(merged, queries.T)
    assert not any(path.exists() for path, _ in sources)


class _Coupled(Preconditioner):
    def apply(self, grads):
        return grads


def test_placed_preconditioner_on_cpu_matches_and_refuses_coupled_modules(workspace):
    factors = Factors.load(workspace / "factors")
    grads = {name: torch.randn(2, mf.n_blocks * mf.lambda_.shape[1], mf.lambda_.shape[2]) for name, mf in factors.modules.items()}
    inner = Scaled(Chain([EKFAC(factors), KFAC(factors)]), 0.5)
    placed = PlacedPreconditioner(inner, list(grads), "cpu", by_module=True)  # one process: it owns every module
    for name, value in placed.apply(grads).items():
        torch.testing.assert_close(value, inner.apply(grads)[name])
    with pytest.raises(PretraceError, match="couples modules"):
        PlacedPreconditioner(Chain([EKFAC(factors), _Coupled()]), list(grads))


def test_split_settings_refused_where_they_cannot_work(workspace, tmp_path, monkeypatch):
    root = workspace
    base = dict(queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=str(tmp_path / "s"))
    with pytest.raises(PretraceError, match="--shard, --shard-factors have no effect without torchrun"):
        from_flags(ScoreSettings, **base, model=str(root / "model"), factors=str(root / "factors"), shard="queries", shard_factors=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the settings are checked before the process group is joined
    with pytest.raises(PretraceError, match="--shard-factors needs every rank to precondition the same queries"):
        from_flags(ScoreSettings, **base, model=str(root / "model"), factors=str(root / "factors"), shard="queries", shard_factors=True)
    with pytest.raises(PretraceError, match="--shard has no effect with --method bm25: they concern preconditioned gradient methods"):
        from_flags(ScoreSettings, **base, method="bm25", shard="queries")


def _values(entry) -> list[float]:
    return list(entry.values()) if isinstance(entry, dict) else entry


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fit_rank(rank: int, world: int, port: int, root: str, out: str, kill_at: int | None) -> None:
    """One rank of a fit; `kill_at`: rank 1 SIGKILLs itself when asked for its kill_at-th batch (both passes
    counted), once rank 0 has checkpointed its second pass."""
    import pretrace.curvature.fit as fitting

    root = Path(root)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    source, pulled, captures = Stage.fitting_batches, [0], [0]

    def fitting_batches(self, path):
        batches = source(self, path)

        def stream():
            for batch in batches():
                pulled[0] += 1
                if rank == 1 and pulled[0] == kill_at:
                    _wait_for(checkpoint_folder(root / out) / "lambda.rank0-of-2.safetensors")
                    os.kill(os.getpid(), signal.SIGKILL)
                yield batch

        return stream

    make = fitting.sampled_document_loss

    def counting_loss(*args, **kwargs):  # the loss of each batch the passes capture
        loss = make(*args, **kwargs)
        return lambda model, batch, index: captures.__setitem__(0, captures[0] + 1) or loss(model, batch, index)

    Stage.fitting_batches, fitting.sampled_document_loss = fitting_batches, counting_loss
    fit(root / "model", root / "docs.jsonl", root / out, ModelOptions(batch_size=BATCH_SIZE, device="cpu"), FitSettings(checkpoint_every=1), progress=False)
    (root / f"{out}.captures.rank{rank}").write_text(str(captures[0]))


def _wait_for(path: Path, seconds: float = 60) -> None:
    stop = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < stop:
        time.sleep(0.05)


def _spawn_fit(root: Path, out: str, kill_at: int | None = None, deadline: float = 120) -> bool:
    """Run a 2-process fit; True if every rank succeeded. Fails the test if the ranks hang."""
    context = mp.spawn(_fit_rank, args=(2, _free_port(), str(root), out, kill_at), nprocs=2, join=False)
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        try:
            if context.join(timeout=1):
                return True
        except ProcessException:  # a rank was killed or raised; spawn has stopped the others
            return False
    for process in context.processes:
        process.kill()
    pytest.fail("the ranks hung after one of them was killed")


def test_killed_rank_does_not_hang_and_fit_resumes_to_same_factors(workspace):
    root, out = workspace, "factors-resumed"
    batches = -(-DOCUMENTS // BATCH_SIZE)
    # rank 1 dies as its second pass begins, so it resumes that pass from scratch while rank 0 restores its sums
    assert not _spawn_fit(root, out, kill_at=batches + 1)
    checkpoint = checkpoint_folder(root / out)
    assert not (checkpoint / "lambda.rank1-of-2.safetensors").exists()
    done = {0: json.loads(read_sealed(checkpoint / "lambda.rank0-of-2.safetensors")[1]["pretrace_part"])["batches"], 1: 0}
    assert not (root / out).exists()

    assert _spawn_fit(root, out)
    _assert_same_factors(root / out, root / "factors")
    local = {0: 5, 1: 4}  # batches of each rank in one pass; the first pass was complete on both ranks
    for rank in (0, 1):
        assert int((root / f"{out}.captures.rank{rank}").read_text()) == local[rank] - done[rank]
    assert not checkpoint.exists()


def test_scores_on_disk_equal_in_memory_scores(workspace, tmp_path):
    root = workspace
    settings = from_flags(ScoreSettings, queries=str(root / "queries.jsonl"), train=str(root / "docs.jsonl"), out=str(tmp_path / "scores"),
                             model=str(root / "model"), factors=str(root / "factors"), per_module=True, scores_on_disk=True, explain=False)
    result = score(settings, ModelOptions(batch_size=BATCH_SIZE, device="cpu"))
    reference, _ = load_scores(root / "scores")
    assert result.scores.dtype == torch.float32 and result.scores.shape == (len(QUERIES), DOCUMENTS)
    assert _max_relative_difference(reference["scores"], result.scores) < 1e-6
    assert _max_relative_difference(reference["per_module"], result.per_module) < 1e-6
    assert not (tmp_path / ".scores.scores").exists()


def test_score_columns_on_disk_place_blocks_by_offset(tmp_path):
    """Blocks written out of order and ragged come back in document order, [*lead, N]."""
    full = torch.randn(2, 3, 11, dtype=torch.float64)
    columns = ScoreColumns("blocks", ScoringPlan(spill_folder=tmp_path))
    for start, stop in ((8, 11), (0, 4), (4, 8)):
        columns.add(start, full[..., start:stop])
    assembled = columns.finish()
    torch.testing.assert_close(assembled, full.float())
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"]


def test_device_map_auto_model_fits_and_scores_like_a_plain_one(workspace):
    """Only the code path: on a CPU machine every block of the map is on the CPU; the hooks that move
    tensors between devices are forced on so that they run as they would across GPUs."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    root = workspace
    stage = load_stage(root / "model", ModelOptions(batch_size=BATCH_SIZE, device="cpu"))
    mapped = AutoModelForCausalLM.from_pretrained(str(root / "model"), device_map="auto", dtype=torch.float32).eval()
    blocks = [f"gpt_neox.{name}" for name, _ in mapped.gpt_neox.named_children()] + ["lm_head"]
    mapped = accelerate.dispatch_model(mapped, {name: "cpu" for name in blocks}, force_hooks=True)
    assert hasattr(mapped.gpt_neox.layers, "_hf_hook")
    documents, queries = stage.document_batches(root / "docs.jsonl"), read_queries(root / "queries.jsonl")
    results = []
    for model in (stage.model, mapped):
        tracked = select_modules(model)
        factors = fit_factors(model, tracked, documents, progress=False)
        ids, grads = query_gradients(model, tracked, stage.query_batches(queries))
        results.append((factors, score_documents(model, tracked, EKFAC(factors).apply(grads), documents(), ids).scores))
    (plain_factors, plain_scores), (mapped_factors, mapped_scores) = results
    for name, module in plain_factors.modules.items():
        torch.testing.assert_close(mapped_factors.modules[name].lambda_, module.lambda_)
    torch.testing.assert_close(mapped_scores, plain_scores)


def test_device_map_option_reaches_from_pretrained(workspace, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    root, seen = workspace, []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k.get("device_map")) or original(*a, **k))
    plain = load_stage(root / "model", ModelOptions(batch_size=BATCH_SIZE, device="cpu"))
    mapped = load_stage(root / "model", ModelOptions(batch_size=BATCH_SIZE, device_map="auto"))
    assert seen == [None, "auto"]
    assert mapped.fingerprint == plain.fingerprint


def test_half_precision_factors_score_close_to_float32(workspace, tmp_path):
    """Factors stored in bfloat16/float16 (accumulated and eigendecomposed in float64) barely move the scores."""
    root = workspace
    stage = load_stage(root / "model", ModelOptions(batch_size=BATCH_SIZE, device="cpu"))
    documents = stage.document_batches(root / "docs.jsonl")
    ids, grads = query_gradients(stage.model, stage.tracked, stage.query_batches(read_queries(root / "queries.jsonl")))
    reference, _ = load_scores(root / "scores")
    for dtype, tolerance in (("bfloat16", 1e-2), ("float16", 1e-3)):
        fit_factors(stage.model, stage.tracked, documents, FitSettings(factor_dtype=dtype), progress=False).save(tmp_path / dtype)
        factors = Factors.load(tmp_path / dtype)
        assert {mf.lambda_.dtype for mf in factors.modules.values()} == {getattr(torch, dtype)}
        scores = score_documents(stage.model, stage.tracked, EKFAC(factors).apply(grads), documents(), ids).scores
        assert _max_relative_difference(reference["scores"], scores) < tolerance, dtype


def test_torchrun_score_killed_mid_pass_resumes_each_rank_at_its_last_save(workspace):
    """Both ranks save their batches; a kill at a rank's second save leaves each rank's own parts, and the rerun
    (scores streamed to disk) replays them and scores the rest: the same scores and explanations as one process."""
    root, out = workspace, "scores-resumed"
    argv = ["score", "--model", "model", "--factors", "factors", "--queries", "queries.jsonl", "--train", "docs.jsonl", "--out", out,
            "--per-module", "--scores-on-disk", "--checkpoint-every", "1", *COMMON]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "PRETRACE_FAULT": "score-checkpoint:2"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pretrace", *argv]
    killed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode != 0 and "injected fault at 'score-checkpoint'" in killed.stderr, killed.stderr[-3000:]
    parts = sorted(p.name for p in checkpoint_folder(root / out).iterdir())
    assert parts and all(name.startswith(("rank0000-", "rank0001-")) for name in parts)
    assert not (root / out).exists()
    # rank 0 resumes at the last batch its explanation state covers (a part saved after it is scored again)
    explained = checkpoint_folder(root / out) / "rank0000-explanations.safetensors"
    saved = json.loads(read_sealed(explained)[1]["pretrace_part"])["done"]
    assert saved >= 1
    resumed = _torchrun(*argv, cwd=root)
    assert f"| {saved}/5 [" in resumed.stderr  # rank 0's bar (its 5 batches) starts there
    _assert_same_scores(root / out, root / "scores")
    assert not checkpoint_folder(root / out).exists()
