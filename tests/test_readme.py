"""The README's commands and Python snippets run as written, in order, in a fresh folder."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A block fenced ```bash slow (or ```python slow) takes long (the demo's 200-epoch head stage, propagate,
# MobileNetV2, ...): it runs as written in the slow tier only.
BLOCK = re.compile(r"```(bash|python)( slow)?\n(.*?)```", re.S)
# a head starts from zero (a uniform guess): after 2 epochs its classes are so close that int8 flips them apart
SHORTER = {"pretrain": ["--epochs", "2"], "finetune": ["--head-epochs", "5", "--epochs", "1"]}


def readme_blocks() -> list[tuple[str, bool, str]]:
    """(language, slow, body) of each bash and python block, in order."""
    return [(language, bool(slow), body) for language, slow, body in BLOCK.findall((ROOT / "README.md").read_text())]


def commands(body: str) -> list[list[str]]:
    lines = body.strip().splitlines()
    assert all(line.startswith("transferkit ") for line in lines), body
    return [shlex.split(line) for line in lines]


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def writes(words: list[str]) -> str | None:
    """The artifact folder a `transferkit pretrain|finetune` command writes: --out, --name, or its recipe's name."""
    if words[1] not in SHORTER:
        return None
    recipe = option(words, "--recipe")
    name = option(words, "--name") or (recipe and tomllib.loads((ROOT / recipe).read_text())[words[1]].get("name"))
    return option(words, "--out") or (name and f"saved_models/{name}")


def reads(body: str) -> str:
    """A block's text with that of the recipe files it names: where the artifacts it reads are named."""
    recipes = {m for m in re.findall(r"--recipe (\S+)", body)}
    return body + "".join((ROOT / recipe).read_text() for recipe in sorted(recipes))


def shortened(words: list[str]) -> list[str]:
    """A training command cut to an epoch or two per stage: same data, recipe, architecture and artifact name."""
    schedule = option(words, "--unfreeze-schedule")
    if schedule is not None:  # its stages name their epochs
        return words + ["--unfreeze-schedule", ",".join(stage.split(":")[0] + ":1" for stage in schedule.split(","))]
    return words + SHORTER[words[1]]


def run_readme(tmp_path: Path, monkeypatch, slow: bool) -> None:
    """Run the README's blocks in order in `tmp_path`. Without `slow`, a slow block is skipped, or, where it
    trains an artifact a later block reads, run with its training commands cut short so that the later block has it."""
    # In one process (CliRunner, exec) to pay TensorFlow's import once; fresh processes are tested elsewhere.
    from helpers import run

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks()
    for i, (language, long, body) in enumerate(blocks):
        if language == "python":
            if slow or not long:
                exec(compile(body, "README.md", "exec"), {"__name__": "readme"})
            continue
        later = "".join(reads(b) for _, _, b in blocks[i + 1:])
        cut_short = long and not slow
        if cut_short and not any(writes(words) and writes(words) in later for words in commands(body)):
            continue
        for words in commands(body):
            if cut_short and words[1] in SHORTER:
                words = shortened(words)
            result = run(*words[1:])
            assert result.exit_code == 0, f"{shlex.join(words)}\n{result.output}\n{result.exception!r}"
    assert (tmp_path / "saved_models" / "digits-classifier" / "serving" / "saved_model.pb").is_file()
    assert (tmp_path / "saved_models" / "digits-staged" / "serving" / "saved_model.pb").is_file()
    for picture in ("schedule.png", "lr-find.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"


def test_readme_has_the_two_fresh_machine_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_quick_examples_run_as_written(tmp_path, monkeypatch):
    run_readme(tmp_path, monkeypatch, slow=False)


def test_the_quick_tier_cuts_short_only_what_later_blocks_read():
    blocks = readme_blocks()
    quick = [body for _, long, body in blocks if not long]
    assert len(quick) >= len(blocks) // 2, "most README blocks should run in the default tier"
    trained = [(writes(words), i) for i, (language, long, body) in enumerate(blocks) if long and language == "bash"
               for words in commands(body)]
    read_later = {path for path, i in trained if path and path in "".join(reads(b) for _, _, b in blocks[i + 1:])}
    assert read_later == {"saved_models/digits-encoder", "saved_models/digits-classifier", "saved_models/digits-staged"}
    assert shortened(["transferkit", "finetune", "--unfreeze-schedule", "head:40,top1:10"])[-1] == "head:1,top1:1"


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    run_readme(tmp_path, monkeypatch, slow=True)


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
