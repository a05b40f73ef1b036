"""The quality-versus-cost benchmark: per-query correlations against scipy, and the micro preset end to end."""

import json

import pytest
import torch
from scipy import stats

from pretrace.bench.quality_vs_cost import QualityVsCostSettings, damping_alignment, issue_criteria, per_query_correlations, run_quality_vs_cost

SEED_FIELDS = {"alg", "pc", "sc", "pc-std", "sc-std", "overhead", "job", "color", "marker"}
LDS_FIELDS = {"lds", "lds-std"}


def test_each_query_is_correlated_over_its_own_block_of_candidates():
    generator = torch.Generator().manual_seed(0)
    scores, truth = torch.randn(3, 12, generator=generator, dtype=torch.float64), torch.randn(3, 12, generator=generator, dtype=torch.float64)
    truth[1, :4] = truth[1, 4:8] = 7.0  # ties, and values outside query 1's block that must not matter
    pcs, scs = per_query_correlations(scores, truth, candidates=4)
    for q in range(3):
        block = slice(4 * q, 4 * q + 4)
        expected_p = stats.pearsonr(scores[q, block].numpy(), truth[q, block].numpy())[0] if q != 1 else float("nan")
        if q == 1:
            assert pcs[q] != pcs[q]  # a constant ground truth has no correlation: nan, not a number that looks valid
            continue
        assert pcs[q] == pytest.approx(expected_p, abs=1e-12)
        assert scs[q] == pytest.approx(stats.spearmanr(scores[q, block].numpy(), truth[q, block].numpy())[0], abs=1e-12)


def test_damping_alignment_is_the_best_rescaled_energy_error_up_to_a_constant():
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    curvature = root @ root.T + 0.1 * torch.eye(6, dtype=torch.float64)
    v = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    exact = torch.linalg.solve(curvature, v.T).T
    x = exact + 0.3 * torch.randn(3, 6, generator=generator, dtype=torch.float64)
    alignment = damping_alignment(x, x @ curvature, v)
    for i in range(3):
        scales = torch.linspace(-3, 3, 60001, dtype=torch.float64)
        errors = [(c * x[i] - exact[i]) @ curvature @ (c * x[i] - exact[i]) for c in scales]
        best = min(errors)  # brute force over the rescaling c
        assert float(v[i] @ exact[i] - alignment[i] * (v[i] @ v[i])) == pytest.approx(float(best), rel=1e-6, abs=1e-9)
    assert damping_alignment(2.5 * exact, 2.5 * v, v) == pytest.approx((v * exact).sum(1) / v.square().sum(1))  # the exact solution is best


def _check_correlations_from_saved_scores(folder, row):
    """A row's correlations recomputed with scipy from the saved score files and the problem's candidate blocks."""
    from scipy.stats import pearsonr, spearmanr

    from pretrace.scores.io import load_scores

    per_query = json.loads((folder / "problem.json").read_text())["candidates_per_query"]
    truth = load_scores(folder / "scores" / "ground-truth-all")[0]["scores"].double().numpy()
    ours = load_scores(folder / "scores" / row["alg"])[0]["scores"].double().numpy()
    blocks = [slice(q * per_query, (q + 1) * per_query) for q in range(len(truth))]
    expected_sc = [spearmanr(ours[q, b], truth[q, b]).statistic for q, b in enumerate(blocks)]
    expected_pc = [pearsonr(ours[q, b], truth[q, b]).statistic for q, b in enumerate(blocks)]
    assert row["per_query_spearman"] == pytest.approx(expected_sc, abs=1e-6)
    assert row["per_query_pearson"] == pytest.approx(expected_pc, abs=1e-6)
    assert row["sc"] == pytest.approx(sum(expected_sc) / len(expected_sc), abs=1e-6)


def test_micro_preset_runs_end_to_end_and_resumes(tmp_path, capsys):
    settings = QualityVsCostSettings(preset="micro", out=str(tmp_path / "run"), device="cpu")
    rows = run_quality_vs_cost(settings)
    algs = [row["alg"] for row in rows]
    for expected in ("ground-truth-all", "ekfac-all", "ekfac-mlp", "ekfac-all-default-damping", "cg-all-iters=2", "lissa-mlp-iters=4", "arnoldi-all",
                     "gdp-all", "cka-mlp", "trak-all", "cg-mlp", "ekfac-cg-all-iters=2", "ekfac-cg-shared-all-iters=2"):
        assert expected in algs
    _check_correlations_from_saved_scores(tmp_path / "run", rows[algs.index("ekfac-all")])
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [set(row) for row in written] == [SEED_FIELDS | LDS_FIELDS] * len(rows)
    assert all(-1 <= row["sc"] <= 1 and -1 <= row["lds"] <= 1 and row["job"] > 0 and row["overhead"] >= 0 for row in written)
    assert "WARNING" in capsys.readouterr().out  # micro retrains fewer than 50 LDS subsets and says so
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "results_summary.json").read_text())
    assert summary["validation_loss"] > 0 and all(summary["ground_truth"]["converged"])
    assert summary["lds"]["subsets"] == len(list((tmp_path / "run" / "lds").glob("subset-*.json"))) == 4
    assert summary["ekfac"]["damping"]["all"]["chosen"] in summary["ekfac"]["damping"]["all"]["grid"]
    assert len(summary["criteria"]) == 6 and all(isinstance(passed, bool) for passed in summary["criteria"].values())

    stamp = (tmp_path / "run" / "scores" / "ekfac-all" / "scores.safetensors").stat().st_mtime_ns
    again = run_quality_vs_cost(settings)
    assert (tmp_path / "run" / "scores" / "ekfac-all" / "scores.safetensors").stat().st_mtime_ns == stamp  # cached, not recomputed
    assert [row["sc"] for row in again] == [row["sc"] for row in rows]
    stages = json.loads((tmp_path / "run" / "results_summary.json").read_text())["stages"]
    assert len(stages) > 20 and set(stages.values()) == {"reused"}  # every stage: model, problem, factors, damping, halves, scores


def _row(alg: str, sc: float, job: float) -> dict:
    return {"alg": alg, "sc": sc, "job": job}


def test_criteria_compare_ekfac_with_the_methods_near_its_cost_only():
    rows = [_row("ground-truth-all", 1.0, 100.0), _row("ekfac-all", 0.62, 0.5), _row("ekfac-mlp", 0.5, 0.4), _row("cg-all-iters=5", 0.6, 4.9),
            _row("cg-all-iters=20", 0.9, 5.1), _row("gdp-all", 0.3, 0.4), _row("cka-all", 0.1, 0.4), _row("gdp-mlp", 0.2, 0.3),
            _row("cka-mlp", 0.25, 0.3), _row("ekfac-cg-all-iters=2", 0.85, 1.5), _row("ekfac-cg-all-iters=4", 0.95, 2.6)]
    checks = list(issue_criteria(rows).items())
    assert [passed for _, passed in checks] == [True, True, True, True, False, False]  # cg-20 is 10.2x dearer; mlp: gdp < cka; 4 iterations: 5.2x
    assert "cg-all-iters=5" in checks[1][0] and "cg-all-iters=20" not in checks[1][0] and "ekfac-cg" not in checks[1][0]
    assert "ekfac-cg-all-iters=2: 0.850 at 3.0x" in checks[5][0] and "iters=4" not in checks[5][0]
    rows[-1]["job"] = 2.5  # 5.0x EK-FAC's time and Spearman 0.95: the refined solver's check passes
    assert list(issue_criteria(rows).values())[5]
    rows[3]["sc"] = 0.63  # a method within 10x that beats EK-FAC fails the check
    assert not list(issue_criteria(rows).values())[1]


def test_cli_group_parses_the_quality_vs_cost_sub_command(capsys):
    import argparse

    from pretrace.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quality-vs-cost", "--preset", "micro", "--out", "somewhere"])
    assert (args.benchmark, args.preset, args.out, args.handler) == ("quality-vs-cost", "micro", "somewhere", bench.run_quality_vs_cost)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["bench", "quality-vs-cost", "--preset", "huge"])
    assert exited.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err  # argparse's usage error


def test_a_folder_of_another_preset_is_refused(tmp_path):
    from pretrace.errors import PretraceError

    (tmp_path / "run.json").write_text(json.dumps({"preset": "micro", "seed": 0, "sizes": {"hidden_size": 1}}))
    with pytest.raises(PretraceError, match="another --out"):
        run_quality_vs_cost(QualityVsCostSettings(preset="micro", out=str(tmp_path)))
