"""benchmarks/gpu_check.py in its reduced CPU mode, so the script a GPU machine runs cannot rot between GPU runs."""

import importlib.util
from pathlib import Path


def test_gpu_check_runs_its_reduced_cpu_mode():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--device", "cpu", "--reduced"])
    assert all(row["passed"] for row in report["agreement"].values()), report["agreement"]
    assert report["agreement"]["float32"]["relative_error"] == 0.0  # the same device and precision: the same numbers
    assert all(value > 0 for value in report["throughput"].values())
    assert report["memory"] is None  # device memory is measured on a GPU only
