"""Workflow behaviour the other tests left unchecked, each against a computation from scratch: truncation at
--max-length, Spearman with ties, exit 130 on an interrupt, and `pretrace report` / `pretrace demo` end to end."""

import json
import re
import warnings

import pytest
import torch

from dense import autograd_document_gradients, hand_query_gradients
from pretrace.config import from_flags
from pretrace.cli import main
from pretrace.metrics import pearson, spearman
from pretrace.modeling.loading import load_model, load_tokenizer
from pretrace.modeling.modules import select_modules
from tiny import SENTENCES, save_tiny_model, write_jsonl

LONG = ["the cat sat on the mat and the dog ran in the park .", "paris is the capital of france and berlin is the capital of germany .",
        "birds can fly .", "rome is in italy and madrid is in spain ."]
PAIRS = [("paris is the capital of", " france ."), ("the sun is hot and the moon", " is cold and birds can fly .")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflows")
    save_tiny_model(root / "model", "gpt_neox", dtype=torch.float64)
    write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(LONG + SENTENCES)])
    write_jsonl(root / "q.jsonl", [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PAIRS)])
    return root


def _gradient_dot(root, max_length):
    """Hand-written losses over the first max_length tokens: documents cut, queries cut after prompt + completion."""
    model = load_model(root / "model", "float64")
    tokenizer, tracked = load_tokenizer(root / "model"), select_modules(model)
    q = hand_query_gradients(model, tracked, tokenizer, PAIRS, max_length=max_length)
    d = autograd_document_gradients(model, tracked, tokenizer, LONG + SENTENCES, max_length=max_length)
    return q @ d.T


def test_sequences_longer_than_max_length_are_truncated_with_a_counted_warning(workspace, tmp_path):
    from pretrace.modeling.stage import ModelOptions
    from pretrace.workflows.score import ScoreSettings, score

    tokenizer = load_tokenizer(workspace / "model")
    limit = 8  # q1 keeps one completion token; some documents fit, some do not
    long_docs = sum(len(tokenizer(t)["input_ids"]) > limit for t in LONG + SENTENCES)
    long_queries = sum(len(tokenizer(p)["input_ids"]) + len(tokenizer(c, add_special_tokens=False)["input_ids"]) > limit for p, c in PAIRS)
    assert 0 < long_docs < len(LONG + SENTENCES) and long_queries == 1  # the case really has both kinds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score(from_flags(ScoreSettings, queries=str(workspace / "q.jsonl"), train=str(workspace / "docs.jsonl"), out=str(tmp_path / "s"),
                                     model=str(workspace / "model"), method="identity", top_k=2),
                       ModelOptions(dtype="float64", device="cpu", batch_size=3, max_length=limit))
    messages = {str(w.message) for w in caught}
    assert f"{long_docs} of {len(LONG + SENTENCES)} documents were longer than --max-length={limit} tokens and were truncated." in messages
    assert f"{long_queries} of {len(PAIRS)} queries were longer than --max-length={limit} tokens and were truncated." in messages
    expected = _gradient_dot(workspace, limit)
    torch.testing.assert_close(result.scores, expected, rtol=1e-8, atol=1e-10)  # float64 on GPT-NeoX
    assert not torch.allclose(expected, _gradient_dot(workspace, 64))  # truncation changes the scores: the check has teeth


def test_spearman_with_ties_equals_scipy():
    """Ties share their mean rank: the values scipy's spearmanr gives, on data with many ties (and Pearson as numpy's)."""
    from scipy.stats import pearsonr, spearmanr

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 4, (30,), generator=generator).double()
        y = x + torch.randint(0, 3, (30,), generator=generator).double()
        assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
        assert pearson(x, y) == pytest.approx(pearsonr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([3.0, 3.0, 1.0])) == pytest.approx(-1.0)


def test_an_interrupted_fit_exits_130_and_resumes_to_the_same_factors(workspace, tmp_path, capsys, monkeypatch):
    import pretrace.curvature.fit as fitting
    from pretrace.curvature import Factors

    args = ["fit", "--model", str(workspace / "model"), "--data", str(workspace / "docs.jsonl"), "--batch-size", "2", "--checkpoint-every", "1",
            "--factor-dtype", "float64", "--dtype", "float64"]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    calls, original = [], fitting.sampled_document_loss

    def interrupted(*a, **kw):  # a loss per captured batch of either pass
        loss = original(*a, **kw)

        def counted(model, batch, index):
            calls.append(1)
            if len(calls) == 9:  # the second pass's third batch
                raise KeyboardInterrupt
            return loss(model, batch, index)

        return counted

    monkeypatch.setattr(fitting, "sampled_document_loss", interrupted)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "f")]) == 130
    assert "interrupted; re-run the same command to resume" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    monkeypatch.setattr(fitting, "sampled_document_loss", original)
    assert main([*args, "--out", str(tmp_path / "f")]) == 0
    reference, resumed = Factors.load(tmp_path / "reference"), Factors.load(tmp_path / "f")
    for name, mf in reference.modules.items():
        assert torch.equal(resumed.modules[name].lambda_, mf.lambda_)


def test_an_interrupted_score_exits_130_leaves_no_output_and_says_it_resumes(workspace, tmp_path, capsys, monkeypatch):
    import pretrace.scores.pairwise as pairwise

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairwise, "document_loss", lambda task=None: interrupt)
    code = main(["score", "--model", str(workspace / "model"), "--method", "identity", "--queries", str(workspace / "q.jsonl"),
                 "--train", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "s")])
    assert code == 130
    assert "re-run the same command to resume where it stopped" in capsys.readouterr().err  # from its checkpoint parts
    assert not (tmp_path / "s").exists()


def test_report_command_lists_each_querys_top_documents_by_score(workspace, tmp_path, capsys):
    """`pretrace score` then `pretrace report`: each query's section lists the documents a hand-computed gradient
    dot product ranks highest, in that order, and the plots are written."""
    scores = tmp_path / "s"
    assert main(["score", "--model", str(workspace / "model"), "--method", "identity", "--queries", str(workspace / "q.jsonl"),
                 "--train", str(workspace / "docs.jsonl"), "--out", str(scores), "--top-k", "3", "--dtype", "float64", "--per-module"]) == 0
    assert main(["report", str(scores), "--out", str(tmp_path / "r"), "--title", "tiny report"]) == 0
    assert f"report -> {tmp_path / 'r' / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "r" / "report.html").read_text()
    assert "<title>tiny report</title>" in page
    sections = page.split('<section class="query"')[1:]
    expected = _gradient_dot(workspace, 64)
    assert len(sections) == len(PAIRS)
    for q, section in enumerate(sections):
        listed = re.findall(r'<span class="id">([^<]*)</span>', section)
        assert listed == [f"d{i}" for i in torch.sort(expected[q], descending=True, stable=True).indices[:3].tolist()]
    for name in ("score_distributions.png", "layer_influence.png"):
        assert (tmp_path / "r" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DEMO = ["--ptb-sentences", "300", "--facts", "6", "--query-facts", "2", "--fact-repeats", "2", "--epochs", "1", "--fit-documents", "40"]


def _ranked_metrics(scores, evidence, k=100):
    """MRR within the top k and recall@10 of one method, counted by hand from its score matrix."""
    mrr, recall = [], []
    for row, correct in zip(scores, evidence):
        ranked = torch.sort(row, descending=True, stable=True).indices[:k].tolist()
        hits = [position for position, i in enumerate(ranked, start=1) if i in correct]
        mrr.append(1.0 / hits[0] if hits else 0.0)
        recall.append(len(set(ranked[:10]) & set(correct)) / len(correct))
    return sum(mrr) / len(mrr), sum(recall) / len(recall)


def test_demo_command_end_to_end_on_a_reduced_world(tmp_path, capsys):
    """A reduced `pretrace demo` (about 10 s): its table's MRR and recall@10 equal those counted from its own score files."""
    from pretrace.scores.io import load_scores

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *DEMO, "--candidates", "90"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "results.json").read_text())
    world = json.loads((out / "world.json").read_text())
    evidence = [world["evidence"][str(i)] for i in world["queries"]]
    for label, folder in (("multi-stage EK-FAC", "scores_ekfac"), ("gradient dot product", "scores_identity")):
        mrr, recall = _ranked_metrics(load_scores(out / folder)[0]["scores"], evidence)
        assert table[label]["mrr"] == pytest.approx(mrr) and table[label]["recall@10"] == pytest.approx(recall)
        assert f"{label:<28} {mrr:>6.3f} {recall:>10.3f}" in printed


@pytest.mark.slow
def test_demo_accepts_fewer_than_100_candidates(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), *DEMO, "--candidates", "20"]) == 0
