"""The README's commands and Python snippets run as written, in order, in a fresh folder."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def readme_blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_the_two_fresh_machine_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_examples_run_as_written(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    cli = [sys.executable, "-m", "transferkit.cli"]
    for language, body in readme_blocks():
        if language == "bash":
            for line in body.strip().splitlines():
                words = shlex.split(line)
                assert words[0] == "transferkit", line
                done = subprocess.run(cli + words[1:], cwd=tmp_path, capture_output=True, text=True)
                assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        else:
            done = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 0, f"{body}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "saved_models" / "digits-classifier" / "serving" / "saved_model.pb").is_file()
