"""The command line: every command, exit codes, one-line errors, nothing half-written."""

import subprocess
import sys

import numpy as np
import pytest

from helpers import run

TINY_PRETRAIN = ["--epochs", "1", "--units", "8,4"]
TINY_FINETUNE = ["--head-epochs", "1", "--epochs", "1", "--label-fraction", "0.1"]


def test_help_does_not_import_tensorflow():
    code = ("import sys; from click.testing import CliRunner; from transferkit.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help'], obj={}); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_bad_flag_value_or_combination_is_one_line_before_tensorflow_starts():
    code = ("import sys; from click.testing import CliRunner; from transferkit.cli import cli\n"
            "for args in (['finetune', '--lr', 'abc'], ['finetune', '--schedule', 'cosine'], "
            "['pretrain', '--units', '12,x'], ['finetune', '--lrr', '3'], ['finetune', '--patience', '-1'], "
            "['finetune', '--data', 'digits'], ['finetune', '--from', 'x', '--backbone', 'mobilenetv2'], "
            "['pretrain', '--val-fraction', '0.5', '--test-fraction', '0.6']):\n"
            "    r = CliRunner().invoke(cli, args, obj={})\n"
            "    print(r.exit_code, repr(r.stderr))\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *answers, imported = out.strip().splitlines()
    assert imported == "[]"
    expected = ["--lr must be a positive number or auto. Received: --lr='abc'", "'--schedule': 'cosine' is not one",
                "--units must be integers such as 128,64; Received: --units='12,x'", "No such option '--lrr'",
                "--patience must be an integer >= 0. Received: --patience=-1",
                # the settings together, as the recipe file and the flags give them
                "finetune needs a base: --from DIR", "The base must be exactly one of --from, --backbone, --base",
                "val_fraction + test_fraction < 1"]
    for answer, words in zip(answers, expected, strict=True):
        code, stderr = answer.split(" ", 1)
        lines = eval(stderr).strip().splitlines()
        assert code == "2" and len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], answer


@pytest.mark.parametrize("command", [[], ["pretrain"], ["finetune"], ["export"], ["evaluate"]])
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.backend_neutral
def test_pretrain_finetune_export_evaluate(tmp_path):
    enc, clf = tmp_path / "enc", tmp_path / "clf"
    result = run("pretrain", "--out", enc, *TINY_PRETRAIN)
    assert result.exit_code == 0, result.output
    assert {"model.keras", "manifest.json", "recipe.toml", "split.json"} <= {p.name for p in enc.iterdir()}
    result = run("finetune", "--from", enc, "--out", clf, "--unfreeze-top", "2", *TINY_FINETUNE)
    assert result.exit_code == 0, result.output
    assert "test accuracy:" in result.output
    result = run("export", clf)
    assert result.exit_code == 0, result.output
    assert (clf / "serving" / "saved_model.pb").is_file()
    result = run("evaluate", clf)
    assert result.exit_code == 0 and "accuracy" in result.output


def test_recipe_file_with_flag_override(tmp_path):
    result = run("pretrain", "--recipe", "recipes/digits.toml", "--out", tmp_path / "enc", *TINY_PRETRAIN)
    assert result.exit_code == 0, result.output
    assert 'task = "denoising"' in (tmp_path / "enc" / "recipe.toml").read_text()
    assert "units = [8, 4]" in (tmp_path / "enc" / "recipe.toml").read_text()


@pytest.fixture(scope="module")
def small_encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "enc"
    assert run("pretrain", "--out", out, *TINY_PRETRAIN).exit_code == 0
    return out


def bad_inputs(tmp_path, enc):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_artifact = tmp_path / "not-artifact"
    not_artifact.mkdir()
    np.savez(tmp_path / "vectors.npz", x=np.zeros((30, 5), "float32"), y=np.arange(30) % 3)
    return {
        "unknown data scheme": (["pretrain", "--data", "csv:x.csv"], 2, "Unknown data scheme 'csv'"),
        "missing path": (["pretrain", "--data", "npz:/no/such.npz"], 2, "does not exist"),
        "empty folder": (["pretrain", "--data", f"dir:{empty}"], 2, "holds no images"),
        "label fraction above 1": (["finetune", "--from", enc, "--label-fraction", "1.5"], 2,
                                   "--label-fraction must be a number in (0, 1]. Received: --label-fraction=1.5"),
        "label fraction 0": (["finetune", "--from", enc, "--label-fraction", "0"], 2,
                             "Received: --label-fraction=0"),
        "unknown backbone": (["finetune", "--backbone", "alexnet"], 2, "Unknown backbone 'alexnet'"),
        "unfreeze-top too large": (["finetune", "--from", enc, "--unfreeze-top", "9"], 2,
                                   "--unfreeze-top 9 is more than the base has blocks: it has 2"),
        "not an artifact": (["finetune", "--from", not_artifact], 2, "is not a transferkit artifact"),
        "shape mismatch": (["finetune", "--from", enc, "--data", f"npz:{tmp_path}/vectors.npz"], 2,
                           "inputs have shape (5,), but the encoder"),
        "two clippings": (["finetune", "--from", enc, "--clipnorm", "1", "--clipvalue", "1"], 2,
                          "Only one of clipnorm and clipvalue can be set. Received: clipnorm=1.0, clipvalue=1.0"),
    }


@pytest.mark.parametrize("case", [
    "unknown data scheme", "missing path", "empty folder", "label fraction above 1", "label fraction 0",
    "unknown backbone", "unfreeze-top too large", "not an artifact", "shape mismatch", "two clippings",
])
def test_bad_input_ends_with_one_line_and_writes_nothing(case, tmp_path, small_encoder):
    args, code, words = bad_inputs(tmp_path, small_encoder)[case]
    out = tmp_path / "out"
    result = run(*args, "--out", out)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and words in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_imagenet_weights_without_network_say_how_to_pass_a_file(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] "
                        "Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    out = tmp_path / "out"
    result = run("finetune", "--backbone", "mobilenetv2", "--weights", "imagenet", "--out", out, *TINY_FINETUNE)
    assert result.exit_code == 1, result.output
    assert "Could not download the ImageNet weights of mobilenetv2" in result.output
    assert "--weights PATH" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_export_of_a_folder_that_is_not_an_artifact(tmp_path):
    result = run("export", tmp_path)
    assert result.exit_code == 2 and "is not a transferkit artifact" in result.output


def test_an_error_is_the_only_line_on_stderr_in_a_fresh_process(tmp_path):
    # the native start-up lines of the backend (banner, oneDNN notice, CUDA probe) do not come before it
    missing = tmp_path / "no-such-model"
    done = subprocess.run([sys.executable, "-m", "transferkit.cli", "evaluate", str(missing)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("Error: ")
    assert str(missing) in done.stderr
