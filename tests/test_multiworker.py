"""`--strategy multiworker` on JAX: two processes on 127.0.0.1 train as one, and only the first writes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import run
from transferkit.training.distributed import process_rows

ROOT = Path(__file__).resolve().parents[1]

# one rank of the run: the API call a user makes, then (test only) its weights and history for comparison
RANK = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import transferkit as tk
    encoder, out, strategy, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    result = tk.finetune(from_=encoder, label_fraction=0.1, head_epochs=2, epochs=1, unfreeze_top=1, lr=0.01,
                         dropout=0.0, cache_features=False, batch_size=batch_size, strategy=strategy, out=out)
    np.savez(out + ".weights.npz", *[keras.ops.convert_to_numpy(w) for w in result.model.weights])
    print("RESULT", json.dumps({"history": result.history, "metrics": result.metrics,
                                "labeled": result.manifest["split"]["sizes"]["labeled"]}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(encoder, out, strategy, batch_size, **env):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-c", RANK, str(encoder), str(out), strategy, str(batch_size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def finish(process) -> tuple[str, dict]:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    [line] = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return stdout, json.loads(line.removeprefix("RESULT "))


def weights(path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.mark.slow
def test_two_processes_train_as_one_with_their_global_batch_and_only_the_first_writes(encoder_dir, tmp_path):
    # 126 labeled examples in global batches of 64 (32 per process): 64 + 62 rows, both even, so no batch is
    # completed with repeated rows and the two runs are the same computation. The head stage and an unfreezing
    # stage, 3 epochs, 6 steps.
    cluster = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{free_port()}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    ranks = [start_rank(encoder_dir, tmp_path / f"rank{i}", "multiworker", 32,
                        KERAS_DISTRIBUTION_PROCESS_ID=str(i), **cluster) for i in range(2)]
    alone = start_rank(encoder_dir, tmp_path / "alone", "default", 64)
    (out0, rank0), (out1, rank1) = (finish(p) for p in ranks)
    _, reference = finish(alone)

    assert rank0["labeled"] == 126
    # the losses are computed once, on the global batch: both ranks log the very same numbers
    assert rank0["history"] == rank1["history"]
    w0, w1, w = (weights(tmp_path / f"{name}.weights.npz") for name in ("rank0", "rank1", "alone"))
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    # against one process: the same float32 arithmetic, except that the batch's loss and gradients are summed
    # in two halves and then across the processes (another order of additions): a few ulp per step (measured
    # 6e-8 on the weights after these 6 steps); 1e-5 is far above that, and far below a step's change.
    assert max(float(np.abs(a - s).max()) for a, s in zip(w0, w)) < 1e-5
    for key, values in reference["history"].items():
        np.testing.assert_allclose(rank0["history"][key], values, rtol=1e-5)
    assert rank0["history"]["loss"][-1] < rank0["history"]["loss"][0] - 1e-3  # it trained

    assert (tmp_path / "rank0" / "model.keras").is_file() and (tmp_path / "rank0" / "history.csv").is_file()
    manifest = json.loads((tmp_path / "rank0" / "manifest.json").read_text())
    assert manifest["versions"]["backend"] == "jax"
    assert not (tmp_path / "rank1").exists()
    assert not any(p.name.endswith(".backup") for p in tmp_path.iterdir())  # written by rank 0, then discarded
    assert "classifier saved to" in out0 and "stage head" in out0
    assert "stage head" not in out1 and "saved to" not in out1  # the other ranks print nothing


@pytest.mark.parametrize("devices,processes", [(2, 2), (4, 2), (4, 4), (8, 2)])
def test_each_process_keeps_an_equal_part_of_every_batch_completed_to_a_multiple_of_the_devices(devices, processes):
    for size in range(1, 12):
        parts = [process_rows(size, devices, processes, i).numpy().tolist() for i in range(processes)]
        padded = -(-size // devices) * devices
        assert sum(parts, []) == list(range(size)) + [i % size for i in range(padded - size)]
        assert {len(p) for p in parts} == {padded // processes}


@pytest.mark.backend_neutral
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's multiworker (TensorFlow refuses it)")
def test_multiworker_without_a_coordinator_is_one_line_exit_2(encoder_dir, tmp_path, monkeypatch):
    for name in ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    result = run("finetune", "--from", encoder_dir, "--strategy", "multiworker", "--out", tmp_path / "c")
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert "--strategy multiworker could not join the other processes" in line
    assert line.endswith("KERAS_DISTRIBUTION_PROCESS_ID=None")
    assert not (tmp_path / "c").exists()


def test_mirrored_on_jax_spreads_each_batch_over_local_devices_as_one_device_would(encoder_dir, tmp_path):
    # two CPU devices stand in for two GPUs; full-batch steps, so both runs are the same computation
    script = textwrap.dedent(f"""
        import numpy as np, keras, jax
        import transferkit as tk
        common = dict(from_={str(encoder_dir)!r}, head_epochs=2, epochs=1, unfreeze_top=3, lr=0.01,
                      label_fraction=0.1, cache_features=False, dropout=0.0, verbose=False)
        one = tk.finetune(batch_size=126, strategy="default", out={str(tmp_path / "one")!r}, **common)
        two = tk.finetune(batch_size=63, strategy="mirrored", out={str(tmp_path / "two")!r}, **common)
        weights = lambda r: [keras.ops.convert_to_numpy(w) for w in r.model.weights]
        print("devices", len(jax.devices()))
        print("labeled", one.manifest["split"]["sizes"]["labeled"])
        print("diff", max(float(np.abs(a - b).max()) for a, b in zip(weights(one), weights(two))))
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split() for line in out.stdout.splitlines() if line.split()[0] in ("devices", "labeled", "diff"))
    assert (int(figures["devices"]), int(figures["labeled"])) == (2, 126)
    assert float(figures["diff"]) < 1e-5  # the same weights as one device with the same global batch


def test_mirrored_on_jax_with_one_device_says_so():
    done = subprocess.run([sys.executable, "-m", "transferkit.cli", "--backend", "jax", "finetune", "--from", "x",
                           "--strategy", "mirrored"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--strategy mirrored spreads each batch over several devices; JAX sees 1" in done.stderr.splitlines()[-1]


def test_a_pretraining_batch_that_does_not_split_over_the_devices_is_refused():
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-m", "transferkit.cli", "pretrain", "--strategy", "mirrored",
                           "--batch-size", "33", "--epochs", "1"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == ("Error: --batch-size 33 does not split over the 2 devices; expected a "
                                            "multiple of 2. Received: batch_size=33")
