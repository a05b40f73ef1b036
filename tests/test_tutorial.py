"""examples/tutorial.py (a jupytext notebook) runs top to bottom as a script, its own checks included, and writes
only into the folder it is given."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "examples" / "tutorial.py"


def _listing(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_the_tutorial_runs_as_a_script_and_writes_only_into_its_folder(tmp_path):
    examples_before = _listing(TUTORIAL.parent)
    env = {**os.environ, "PRETRACE_TUTORIAL_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(TUTORIAL)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "all checks passed" in done.stdout
    assert any(tmp_path.iterdir()), "the tutorial wrote its score folder into PRETRACE_TUTORIAL_DIR"
    assert (tmp_path / "scores-multistage" / "scores.safetensors").is_file()
    assert _listing(TUTORIAL.parent) == examples_before, "the tutorial wrote nothing into examples/"
