"""The command line end to end on a tiny saved model, and its answers to bad input."""

import json

import pytest
import torch

from pretrace.cli import main
from tiny import SENTENCES, save_tiny_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model", "gpt2", dtype=torch.float32)
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    (root / "q.jsonl").write_text(json.dumps({"prompt": "paris is the capital of", "completion": " france ."}) + "\n")
    assert main(["fit", "--model", str(root / "model"), "--data", str(root / "docs.jsonl"), "--out", str(root / "factors"), "--batch-size", "3"]) == 0
    return root


def _score(root, out, *extra, model="model", factors="factors", queries="q.jsonl", train="docs.jsonl"):
    """`pretrace score` of the workspace: --model and --factors for a curvature method, only what the method reads otherwise."""
    method = extra[extra.index("--method") + 1] if "--method" in extra else "ekfac"
    stage = [] if method in ("bm25", "embedding") else ["--model", str(root / model)]
    curvature = ["--factors", str(root / factors)] if method in ("ekfac", "kfac", "diagonal") else []
    return main(["score", *stage, *curvature, "--queries", str(root / queries), "--train", str(root / train), "--out", str(out), *extra])


def test_fit_score_inspect(workspace, tmp_path, capsys):
    root = workspace
    assert _score(root, tmp_path / "s", "--top-k", "2") == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "top_k.jsonl").read_text().splitlines()]
    assert rows[0]["documents"][0]["text"] == "paris is the capital of france ."
    assert len(rows[0]["documents"]) == 2
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert main(["inspect", str(root / "factors")]) == 0
    out = capsys.readouterr().out
    assert "method ekfac" in out and "transformer.h.0.attn.c_attn" in out


def test_help_explains_every_option(capsys):
    for command in ("fit", "score", "inspect", "finetune", "demo"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--attention-blocks" in text and "positive means" in text


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"text": "the cat"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("empty.jsonl", "", "empty"),
        ("nocompletion.jsonl", '{"prompt": "the cat", "completion": "  "}\n', "'completion' is empty"),
        ("wrongfield.jsonl", '{"question": "x"}\n', "needs 'prompt' and 'completion'"),
    ],
)
def test_bad_queries_are_named(workspace, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    code = main(["score", "--model", str(workspace / "model"), "--factors", str(workspace / "factors"), "--queries", str(tmp_path / name),
                 "--train", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "s")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_bad_training_file_reports_line_and_leaves_nothing(workspace, tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text('{"text": "the cat sat"}\n{"txt": "x"}\n')
    assert main(["fit", "--model", str(workspace / "model"), "--data", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "f")]) == 2
    assert "docs.jsonl:2: missing field 'text'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_missing_and_non_model_folders(workspace, tmp_path, capsys):
    assert _score(workspace, tmp_path / "s", model="nowhere") == 2
    assert "no such folder" in capsys.readouterr().err
    (workspace / "notamodel").mkdir(exist_ok=True)
    assert _score(workspace, tmp_path / "s", model="notamodel") == 2
    assert "not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_factors_of_another_model_are_refused(workspace, tmp_path, capsys):
    save_tiny_model(workspace / "other", "gpt2", seed=3, dtype=torch.float32)
    assert _score(workspace, tmp_path / "s", model="other") == 2
    assert "different model" in capsys.readouterr().err
    assert _score(workspace, tmp_path / "s", "--preset", "mlp", "--attention-blocks", "head", model="model") == 0
    assert main(["score", "--model", str(workspace / "model"), "--factors", str(workspace / "factors"), "--queries", str(workspace / "q.jsonl"),
                 "--train", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "s2"), "--preset", "attention", "--attention-blocks", "head"]) == 2
    assert "shape" in capsys.readouterr().err


def test_existing_output_needs_overwrite(workspace, tmp_path, capsys):
    assert _score(workspace, tmp_path / "s") == 0
    assert _score(workspace, tmp_path / "s") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _score(workspace, tmp_path / "s", "--overwrite") == 0


def test_nan_factors_are_refused(workspace, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file, save_file

    from pretrace.storage import mark_folder

    shutil.copytree(workspace / "factors", tmp_path / "f")
    tensors = load_file(str(tmp_path / "f" / "factors.safetensors"))
    key = next(k for k in tensors if k.endswith(".lambda"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "f" / "factors.safetensors"))
    mark_folder(tmp_path / "f", "fit", manifest=True)  # a matching manifest: the NaN itself must be caught
    code = main(["score", "--model", str(workspace / "model"), "--factors", str(tmp_path / "f"), "--queries", str(workspace / "q.jsonl"),
                 "--train", str(workspace / "docs.jsonl"), "--out", str(tmp_path / "s")])
    assert code == 2 and "NaN" in capsys.readouterr().err


def test_self_influence_is_the_preconditioned_squared_norm(workspace, tmp_path, capsys):
    from safetensors.torch import load_file

    from dense import autograd_document_gradients
    from pretrace.data import Document
    from pretrace.modeling.loading import load_model, load_tokenizer
    from pretrace.modeling.modules import select_modules

    assert _score(workspace, tmp_path / "s", "--method", "identity", "--self-influence") == 0
    values = load_file(str(tmp_path / "s" / "scores.safetensors"))["self_influence"]
    model = load_model(workspace / "model")
    grads = autograd_document_gradients(model, select_modules(model), load_tokenizer(workspace / "model"),
                                        [Document(str(i), s) for i, s in enumerate(SENTENCES)])
    torch.testing.assert_close(values, grads.square().sum(1), rtol=1e-4, atol=1e-6)
    assert _score(workspace, tmp_path / "s2", "--method", "bm25", "--self-influence") == 2
    assert "--self-influence has no effect with --method bm25" in capsys.readouterr().err
