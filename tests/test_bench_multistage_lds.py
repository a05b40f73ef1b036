"""The multi-stage LDS benchmark at micro sizes: its training stages, its summaries against hand counts, its refusals,
and a whole run that resumes from its cache."""

import json

import pytest
import torch

from pretrace.bench.multistage_lds import MultiStageLDSSettings, finetune, pretrain, run_multistage_lds, spectrum_summary, summarise, world
from pretrace.errors import PretraceError
from pretrace.metrics import spearman

MICRO = dict(pool=8, kept=4, subsets=3, queries=3, pairs=6, pretrain_steps=20, finetune_steps=10, alphas="1e-1,1e-3")


def test_stages_minimise_their_own_objectives():
    """Pre-training lowers mean document loss + w/2‖θ‖²; fine-tuning stays near θ_pt, nearer for a larger α."""
    from pretrace.bench.quality_vs_cost import query_losses

    settings = MultiStageLDSSettings(**{**MICRO, "pretrain_steps": 60, "finetune_steps": 40})
    documents, pairs, queries, tokenizer = world(settings)
    model = pretrain(settings, tokenizer, documents, seed=0)
    again = pretrain(settings, tokenizer, documents, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))  # a seed is a model
    distance = lambda m: sum((p - q).square().sum() for p, q in zip(m.parameters(), model.parameters())).sqrt()  # noqa: E731
    norm = lambda m: sum(p.square().sum() for p in m.parameters()).sqrt()  # noqa: E731
    decayed = pretrain(MultiStageLDSSettings(**{**MICRO, "pretrain_steps": 60, "weight_decay": 1.0}), tokenizer, documents, seed=0)
    assert norm(decayed) < norm(model)  # the w/2‖θ‖² term is in the objective
    near, far = (finetune(settings, model, tokenizer, pairs, alpha, seed=0) for alpha in (10.0, 1e-3))
    assert 0 < distance(near) < distance(far)
    before, after = query_losses(model, tokenizer, queries, 64), query_losses(far, tokenizer, queries, 64)
    assert sum(after) < sum(before)  # the fine-tune taught the rule the queries test


def test_summary_pairs_rows_with_the_reference_and_counts_the_spectrum():
    lds = {"ref": [0.5, 0.4, 0.6, 0.5], "worse": [0.1, 0.0, 0.2, 0.1], "noise ceiling": [0.9, 0.9, 0.9, 0.9]}
    table = summarise(lds, "ref")
    assert table["rows"]["ref"]["mean"] == pytest.approx(0.5)
    assert table["differences"]["worse"]["mean"] == pytest.approx(-0.4) and table["differences"]["worse"]["losses"] == 4
    assert set(table["differences"]) == {"worse"}
    summary = spectrum_summary(torch.tensor([0.0, 1e-4, 0.05, 2.0, 10.0], dtype=torch.float64), [1e-1, 1e-3])
    assert summary["above"] == {"0.1": 2, "0.001": 3} and summary["largest"] == 10.0


def test_refuses_bad_alphas():
    for alphas in ("", "0.1,x", "0.1,-1", "0.1,0.1", "nan", "0.1,inf"):
        with pytest.raises(PretraceError, match="--alphas"):
            MultiStageLDSSettings(alphas=alphas)


def test_micro_run_writes_every_row_and_resumes(tmp_path):
    settings = MultiStageLDSSettings(out=str(tmp_path / "run"), **{**MICRO, "alphas": "1e-1,3e-2", "weight_decay": 0.1})
    with pytest.warns(UserWarning, match="fewer than 50"):
        first = run_multistage_lds(settings)
    rows = first["alphas"]["0.1"]["rows"]
    assert {"multi-stage EK-FAC", "multi-stage K-FAC", "multi-stage EK-FAC-CG (4 it.)", "multi-stage exact GGN (dense solves)",
            "pre-trained-only EK-FAC", "fine-tuned-only EK-FAC", "gradient dot product", "TRAK (one model per stage)", "noise ceiling"} <= set(rows)
    assert all(-1 - 1e-9 <= row["mean"] <= 1 + 1e-9 for row in rows.values()), rows
    assert len(list((tmp_path / "run" / "retrained-seed-1").glob("subset-*.json"))) == 3
    with pytest.warns(UserWarning, match="fewer than 50"):
        second = run_multistage_lds(settings)
    assert set(second["stages"].values()) == {"reused"}
    assert json.dumps(second["alphas"]) == json.dumps(first["alphas"])
    # two seeds per subset: seeds 0-1 measured (their mean), 2-3 the ceiling; the seeds already retrained are reused
    with pytest.warns(UserWarning, match="fewer than 50"):
        averaged = run_multistage_lds(MultiStageLDSSettings(out=settings.out, seeds_per_subset=2, **{**MICRO, "alphas": "1e-1,3e-2", "weight_decay": 0.1}))
    losses = torch.tensor([[json.loads((tmp_path / "run" / f"retrained-seed-{seed}" / f"subset-{k:03d}.json").read_text())["query_losses"][:3]
                            for k in range(3)] for seed in range(4)], dtype=torch.float64)  # [seed, subset, query] at α = 0.1
    measured, repeat = losses[:2].mean(0), losses[2:].mean(0)
    ceiling = [spearman(-repeat[:, q], -measured[:, q]) for q in range(3)]
    assert averaged["alphas"]["0.1"]["per_query"]["noise ceiling"] == pytest.approx(ceiling, nan_ok=True)
    assert averaged["stages"]["main models"] == "reused"


def test_cli_parses_the_sub_command_and_refuses_bad_alphas_before_work(tmp_path, capsys):
    from pretrace.cli import main

    assert main(["bench", "multistage-lds", "--alphas", "0.1,0", "--out", str(tmp_path / "run")]) == 2
    assert "--alphas" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("pretrace ")
