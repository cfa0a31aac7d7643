"""Training across processes and machines on JAX: `keras.distribution.DataParallel` over every device of every process.

Every process runs the same command. `start` calls `keras.distribution.initialize()`,
which reads `KERAS_DISTRIBUTION_JOB_ADDRESSES` (the coordinator's `host:port`
first), `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`
(JAX finds them itself on Slurm, Open MPI and Cloud TPU pods). The variables
are replicated on every device; each step's global batch (`batch_size` per
device times the devices of all processes) is split among the devices and the
gradients are averaged over all of them, so every process holds the same weights.

The data stays tf.data. Every process builds the same pipelines (the same
seeds give the same order) and keeps its slice of each global batch. Keras's
own auto-sharding rebatches the stream, which gives the processes last batches
of unequal sizes; here a batch whose size is not a multiple of the device count
is completed with copies of its first rows (at most devices - 1 of them), as
PyTorch's `DistributedSampler` does.

Example (in each of two shells on one machine, `KERAS_BACKEND=jax`):

>>> import os; os.environ.update(KERAS_DISTRIBUTION_JOB_ADDRESSES="127.0.0.1:12345",   # doctest: +SKIP
...                   KERAS_DISTRIBUTION_NUM_PROCESSES="2", KERAS_DISTRIBUTION_PROCESS_ID="0")  # 1 in the other
>>> run = start("auto")                                               # doctest: +SKIP
>>> run.num_replicas_in_sync                                          # doctest: +SKIP
2
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import keras
import numpy as np

from transferkit.errors import SettingsError, TransferkitError

ENVIRONMENT = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
               "KERAS_DISTRIBUTION_PROCESS_ID")


class ProcessShards(keras.distribution.DataParallel):
    """`DataParallel` whose processes each keep an equal, contiguous slice of every global batch.

    A batch whose size is not a multiple of the devices (the last one) is completed
    with copies of its first rows, on one process with several devices too.

    Args:
        devices: list. The devices of all processes, in the mesh's order.
    """

    def __init__(self, devices: list):
        super().__init__(devices=devices)

    def distribute_dataset(self, dataset):
        import jax
        import tensorflow as tf

        processes, index = jax.process_count(), jax.process_index()
        devices = len(self.device_mesh.devices.flat)
        if processes == 1 and devices == 1:
            return dataset

        def local_part(*batch):
            mine = process_rows(tf.shape(tf.nest.flatten(batch)[0])[0], devices, processes, index)
            part = tf.nest.map_structure(lambda t: tf.gather(t, mine), batch)
            return part if len(part) > 1 else part[0]

        return dataset.map(local_part, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).prefetch(tf.data.AUTOTUNE)


def process_rows(size, devices: int, processes: int, index: int):
    """The rows of a global batch of `size` rows that process `index` of `processes` keeps (a tensor of indices).

    The batch is completed to a multiple of `devices` with its first rows again,
    then cut into `processes` equal, contiguous parts, in process order (the order
    of the mesh's devices).

    Example:

    >>> [process_rows(5, 2, 2, i).numpy().tolist() for i in range(2)]
    [[0, 1, 2], [3, 4, 0]]
    """
    import tensorflow as tf

    rows = tf.concat([tf.range(size), tf.range((-size) % devices) % size], axis=0)
    share = tf.shape(rows)[0] // processes
    return rows[index * share:(index + 1) * share]


class DataParallelRun:
    """What the pipelines use of a strategy: the replicas (all devices), and a scope that sets the distribution."""

    def __init__(self, distribution: ProcessShards):
        self.distribution = distribution
        self.num_replicas_in_sync = len(distribution.device_mesh.devices.flat)

    def scope(self):
        return self.distribution.scope()


def start(device: str = "auto") -> DataParallelRun:
    """Join the other processes (once per process) and spread training over all their devices of kind `device`.

    On CPU the processes reduce gradients with gloo.

    Raises:
        SettingsError: no coordinator found, or JAX already running alone in this process.
        TransferkitError: `device` asks for an accelerator JAX does not see.
    """
    import jax

    if not jax.distributed.is_initialized():
        collectives = jax.config.jax_cpu_collectives_implementation
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            keras.distribution.initialize()
        except (ValueError, RuntimeError) as err:
            jax.config.update("jax_cpu_collectives_implementation", collectives)
            given = ", ".join(f"{name}={os.environ.get(name)!r}" for name in ENVIRONMENT)
            raise SettingsError(
                f"--strategy multiworker could not join the other processes ({str(err).splitlines()[0]}); expected "
                f"{', '.join(ENVIRONMENT)} set in every process before it starts JAX, or a cluster JAX detects "
                f"(Slurm, Open MPI, TPU pod). Received: {given}") from None
    if device == "cpu":
        devices = jax.devices("cpu")
    elif device in ("gpu", "tpu") and jax.default_backend() != device:
        raise TransferkitError(f"--device {device}, but JAX sees no {device.upper()} on this machine "
                               f"(it runs on {jax.default_backend()}).")
    else:
        devices = jax.devices()
    return DataParallelRun(ProcessShards(devices))


def on_local_devices(devices: list) -> DataParallelRun:
    """Training spread over this process's `devices` (GPUs, TPU cores; CPUs for tests), without other processes:
    `--strategy mirrored` on JAX, and `auto` where JAX sees several accelerators.

    Raises:
        SettingsError: one device only, where `mirrored` was asked for.
    """
    if len(devices) < 2:
        raise SettingsError(f"--strategy mirrored spreads each batch over several devices; JAX sees "
                            f"{len(devices)} ({devices[0].platform}). Use --strategy auto, or multiworker for "
                            "several processes.")
    return DataParallelRun(ProcessShards(devices))


def same_on_every_process(value: int) -> bool:
    """Whether every process holds the same `value` (True for one process, and on TensorFlow)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int64(value)) == value))


@contextlib.contextmanager
def on_this_process() -> Iterator[None]:
    """Run Keras as if no distribution were set: for work one process does alone (saving) or each does whole.

    Under a distribution, Keras creates variables (saving creates a throw-away
    optimizer) with a check that every process passes the same values, which
    waits for the others; `predict` gathers outputs the process cannot read.
    """
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)
