"""Memory and speed of an image-folder run as the folder grows: streamed, memory must stay flat.

Folders of 1,000, 4,000 and 16,000 JPEGs (two classes, 120..200 pixels a side,
read at 160x160). For each, in child processes:

- `finetune`: one head-only stage of `finetune --backbone mobilenetv2 --weights
  none --head-epochs 1 --epochs 0 --image-size 160` (its check pass, the cached
  base outputs, the head's epoch, the test evaluation): peak RSS and images/s
  (folder images over the whole run's wall time);
- `ours`: read -> resize -> batch (64) through `transferkit.data.sources.pipeline`, every
  image once: images/s and peak RSS;
- `keras`: the same through `keras.utils.image_dataset_from_directory`
  (`image_size=(160, 160)`, batch 64, no shuffle): the baseline.

`ours` and `keras` run in turn `--repeats` times and the medians are kept: on a
shared machine the load swings one run's speed by 3x. Each also reports its CPU
time an image (user + system over the timed part, every thread), which that
load barely moves. Then the same two on a
folder of 4,000 JPEGs that are all 160x160 already (no resizing: ours decodes
them and stops there, Keras's resizes them to their own size). Both decode
these plain JPEGs with `tf.io` and resize them as Keras does (bilinear,
`tf.image.resize` in the tf.data graph); ours with libjpeg's accurate DCT
(Pillow's levels), Keras's with the fast one.

Peak RSS is each child's own `ru_maxrss` (`os.wait4`, the figure
`resource.getrusage(RUSAGE_CHILDREN)` gives for one child). Goals: finetune's
peak RSS at the largest folder <= 1.15 x at the smallest; ours >= 1.0 x keras in images/s.

    python bench/data_scale.py [--sizes 1000 4000 16000] [--repeats 3] [--work /tmp/tk-data-scale]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE = 160

CPU = "import resource; cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system s"

PIPELINE_OURS = CPU + """
import sys, time
import keras  # imported before the clock starts, as for keras's pipeline
from transferkit.data.sources import load_data, pipeline
data = load_data(sys.argv[1], image_size={side}, verbose=False)
start, cpu0, n = time.perf_counter(), cpu(), 0
for batch in pipeline(data.x, batch_size=64):
    n += int(batch.shape[0])
print(n / (time.perf_counter() - start), (cpu() - cpu0) / n * 1e6)
"""

PIPELINE_KERAS = CPU + """
import sys, time
import keras
start, cpu0 = time.perf_counter(), cpu()
ds = keras.utils.image_dataset_from_directory(sys.argv[1], image_size=({side}, {side}), batch_size=64,
                                              shuffle=False, verbose=False)
n = 0
for x, y in ds:
    n += int(x.shape[0])
print(n / (time.perf_counter() - start), (cpu() - cpu0) / n * 1e6)
"""


def make_folder(root: Path, count: int, sides: tuple[int, int] = (120, 200)) -> Path:
    """`count` JPEGs in two classes, sides drawn in `sides`, smooth gradients with noise (like photos, not noise)."""
    from PIL import Image

    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(count)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = rng.integers(sides[0], sides[1] + 1, 2)
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(40, 200, 3)
        pixels = ramp + rng.normal(0, 12, (h, w, 3)) + (60 if i % 2 else 0)
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(root / "ab"[i % 2] / f"{i:06d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def measure(command: list[str]) -> tuple[float, float, str]:
    """Run `command` as a child: (wall seconds, peak RSS in MiB, its stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out, err = child.communicate()
    wall = time.perf_counter() - start
    # communicate() waited for it; its rusage is the process's children's, so measure each child in a wrapper
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return wall, float(out.split("peak_rss_kib=")[-1].split()[0]) / 1024 if "peak_rss_kib=" in out else float("nan"), out


def wrapped(argv: list[str]) -> list[str]:
    """`argv` run by a wrapper that prints the child's own peak RSS (`RUSAGE_CHILDREN` of a process with one child)."""
    code = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
            "print('peak_rss_kib=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(done.returncode)")
    return [sys.executable, "-c", code, *argv]


def read_speeds(folder: Path, repeats: int) -> tuple[float, ...]:
    """Median images/s, largest peak RSS (MiB) and median CPU microseconds an image (user + system, every thread)
    of ours and of keras's read -> resize -> batch, run in turn: the CPU time is what the shared cores' load
    barely moves."""
    runs = {"ours": [], "keras": []}
    for _ in range(repeats):
        for name, code, where in (("ours", PIPELINE_OURS, f"dir:{folder}"), ("keras", PIPELINE_KERAS, str(folder))):
            _, rss, out = measure(wrapped([sys.executable, "-c", code.format(side=SIDE), where]))
            runs[name].append((float(out.split()[0]), rss, float(out.split()[1])))
    return tuple(x for name in ("ours", "keras") for x in (statistics.median(s for s, _, _ in runs[name]),
                                                          max(r for _, r, _ in runs[name]),
                                                          statistics.median(c for _, _, c in runs[name])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tk-data-scale"))
    args = parser.parse_args()

    rows = []
    for count in args.sizes:
        folder = make_folder(args.work / f"jpegs-{count}", count)
        wall, rss, _ = measure(wrapped([
            sys.executable, "-m", "transferkit.cli", "finetune", "--data", f"dir:{folder}", "--backbone",
            "mobilenetv2", "--weights", "none", "--image-size", str(SIDE), "--head-epochs", "1", "--epochs", "0",
            "--lr", "1e-3", "--out", str(args.work / f"clf-{count}")]))
        rows.append((count, rss, count / wall, wall, *read_speeds(folder, args.repeats)))
        print(*rows[-1], flush=True)
    same = make_folder(args.work / f"jpegs-{SIDE}-4000", 4000, (SIDE, SIDE))
    same_row = read_speeds(same, args.repeats)

    base = rows[0][1]
    print(f"\n| images | finetune peak RSS (MiB) | vs {rows[0][0]} | finetune images/s (wall s) "
          "| ours read-resize-batch images/s (RSS MiB) | keras images/s (RSS MiB) | ours / keras "
          "| CPU us/image ours / keras |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def reading(ours, ours_rss, ours_cpu, keras, keras_rss, keras_cpu) -> str:
        return (f"{ours:.0f} ({ours_rss:.0f}) | {keras:.0f} ({keras_rss:.0f}) | {ours / keras:.2f}x "
                f"| {ours_cpu:.0f} / {keras_cpu:.0f} |")

    for count, rss, speed, wall, *read in rows:
        print(f"| {count:,} | {rss:.0f} | {rss / base:.2f}x | {speed:.0f} ({wall:.0f}) | {reading(*read)}")
    print(f"| 4,000 all {SIDE}x{SIDE} (no resizing) | | | | {reading(*same_row)}")


if __name__ == "__main__":
    main()
