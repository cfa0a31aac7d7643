"""The README's commands and Python snippets run as written, in order, in a fresh folder."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def readme_blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_the_two_fresh_machine_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    # In one process (CliRunner, exec) to pay TensorFlow's import once; fresh processes are tested elsewhere.
    from click.testing import CliRunner

    from transferkit.cli import cli

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    for language, body in readme_blocks():
        if language == "bash":
            for line in body.strip().splitlines():
                words = shlex.split(line)
                assert words[0] == "transferkit", line
                result = CliRunner().invoke(cli, words[1:], obj={})
                assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception!r}"
        else:
            exec(compile(body, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "saved_models" / "digits-classifier" / "serving" / "saved_model.pb").is_file()
    assert (tmp_path / "saved_models" / "digits-staged" / "serving" / "saved_model.pb").is_file()
    for picture in ("schedule.png", "lr-find.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_readme_jax_commands_run_as_written(tmp_path):
    # `--backend` must come before Keras starts: each command in a fresh process
    [block] = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KERAS_BACKEND", None)
    for line in block.strip().splitlines():
        words = shlex.split(line)
        assert words[0] == "transferkit", line
        done = subprocess.run([sys.executable, "-m", "transferkit.cli", *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    manifest = json.loads((tmp_path / "saved_models" / "digits-classifier-jax" / "manifest.json").read_text())
    assert manifest["versions"]["backend"] == "jax"
    assert (tmp_path / "saved_models" / "digits-classifier-jax" / "serving" / "saved_model.pb").is_file()
