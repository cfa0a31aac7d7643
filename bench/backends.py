"""The same fine-tuning job on TensorFlow and on JAX, each in a fresh process: wall and CPU seconds, and the ratio.

One saved encoder (pretrained once, on TensorFlow); then, in a fresh process per
backend and repeat, `transferkit.finetune` from it with the same settings. Each
child reports the seconds of its imports, of the whole call and of each stage
(from the manifest), and on JAX the number of XLA compilations and the seconds
they took (`jax_log_compiles`). CPU seconds (user + system, of the child) are
printed beside wall seconds: on a shared machine they move less with the load.

    python bench/backends.py [--repeats 2] [--label-fraction 0.2] [--head-epochs 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, logging, re, sys, time
started = time.perf_counter()
import keras, transferkit as tk
imported = time.perf_counter() - started
compiles = []
if keras.backend.backend() == "jax":
    import jax

    class Count(logging.Handler):
        def emit(self, record):
            found = re.search(r"Finished XLA compilation of (.*) in ([0-9.e-]+) sec", record.getMessage())
            if found:
                compiles.append((found.group(1), float(found.group(2))))

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(Count())
    logging.getLogger("jax").setLevel(logging.WARNING)
settings = json.loads(sys.argv[1])
started = time.perf_counter()
result = tk.finetune(**settings)
seconds = time.perf_counter() - started
names = {}
for name, _ in compiles:
    names[name] = names.get(name, 0) + 1
print("RESULT " + json.dumps({
    "import": imported, "finetune": seconds, "accuracy": result.metrics["test_accuracy"],
    "stages": {s["name"]: s["seconds"] for s in result.manifest["stages"]},
    "compiles": len(compiles), "compile_seconds": sum(s for _, s in compiles),
    "most_compiled": sorted(names.items(), key=lambda kv: -kv[1])[:5]}))
"""


def run_child(backend: str, settings: dict) -> dict:
    """One fine-tuning in a fresh process on `backend`: its report, with its CPU seconds."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{backend} child failed:\n{done.stderr[-3000:]}")
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    report.update(process=wall, cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--label-fraction", type=float, default=0.2)
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--unfreeze-top", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tk-backends-"))
    encoder = work / "encoder"
    subprocess.run([sys.executable, "-c", "import transferkit as tk; "
                    f"tk.pretrain(data='digits', epochs=2, out={str(encoder)!r}, verbose=False)"],
                   check=True, env={**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT),
                                    "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True)
    reports: dict[str, list[dict]] = {"tensorflow": [], "jax": []}
    for i in range(args.repeats):
        for backend in reports:
            settings = dict(from_=str(encoder), label_fraction=args.label_fraction, head_epochs=args.head_epochs,
                            epochs=args.epochs, unfreeze_top=args.unfreeze_top, lr=0.01,
                            out=str(work / f"{backend}{i}"), verbose=False)
            reports[backend].append(run_child(backend, settings))
    print(f"finetune --label-fraction {args.label_fraction} --head-epochs {args.head_epochs} --epochs {args.epochs} "
          f"--unfreeze-top {args.unfreeze_top}, median of {args.repeats} fresh processes per backend")
    median = {b: {k: statistics.median(r[k] for r in rs) for k in ("import", "finetune", "process", "cpu")}
              for b, rs in reports.items()}
    for backend, rs in reports.items():
        m = median[backend]
        stages = ", ".join(f"{name} {statistics.median(r['stages'][name] for r in rs):.1f}" for name in rs[0]["stages"])
        print(f"{backend:>10}: finetune {m['finetune']:.1f} s (stages: {stages}), imports {m['import']:.1f} s, "
              f"process {m['process']:.1f} s wall, {m['cpu']:.1f} s CPU, test accuracy {rs[0]['accuracy']:.3f}")
        if backend == "jax":
            print(f"{'':>10}  {rs[-1]['compiles']} XLA compilations, {rs[-1]['compile_seconds']:.1f} s; most often: "
                  + ", ".join(f"{name} x{n}" for name, n in rs[-1]["most_compiled"]))
    print(f"jax / tensorflow: finetune {median['jax']['finetune'] / median['tensorflow']['finetune']:.2f}, "
          f"CPU {median['jax']['cpu'] / median['tensorflow']['cpu']:.2f}")


if __name__ == "__main__":
    main()
