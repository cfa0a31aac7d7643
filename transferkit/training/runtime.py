"""Where training runs: backend, device, strategy, precision.

On TensorFlow, `auto` picks a TPUStrategy when a TPU resolver finds one, a MirroredStrategy
with two or more GPUs, and the default strategy otherwise. Models, optimizers and metrics are built inside
`strategy.scope()`; the global batch is `batch_size` per replica times the
number of replicas, and the learning rate is left as given (scale it yourself
with the batch if you want the linear scaling rule). On JAX, `auto` and
`default` train on one device (`LocalRun`); the `tf.distribute` strategies are
TensorFlow's; `multiworker` trains on all devices of all processes with
`keras.distribution.DataParallel` (see `transferkit.training.distributed`). On
TensorFlow `multiworker` is refused, whatever the Keras version (keras-team/keras#20585).

Example:

>>> from transferkit.training.runtime import resolve_strategy
>>> strategy = resolve_strategy("cpu", "default")
>>> strategy.num_replicas_in_sync
1
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from transferkit.errors import SettingsError, TransferkitError

BACKENDS = ("tensorflow", "jax")
DEVICES = ("auto", "cpu", "gpu", "tpu")
STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def choose_backend(backend: str) -> None:
    """Make Keras compute on `backend` by setting KERAS_BACKEND, which Keras reads once, when first imported.

    Raises:
        SettingsError: an unknown backend, or Keras already running on another one in this process.
    """
    if backend not in BACKENDS:
        raise SettingsError(f"backend must be one of {', '.join(BACKENDS)}. Received: backend={backend!r}")
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise SettingsError(f"Keras already runs on {keras.backend.backend()} in this process; set KERAS_BACKEND="
                            f"{backend} before it is imported. Received: backend={backend!r}")
    os.environ["KERAS_BACKEND"] = backend


def resolve_strategy(device: str = "auto", strategy: str = "auto"):
    """The `tf.distribute.Strategy` for `device` and `strategy` (see the module docstring); on JAX a `LocalRun`."""
    import keras

    if device not in DEVICES:
        raise SettingsError(f"device must be one of {', '.join(DEVICES)}. Received: device={device!r}")
    if strategy not in STRATEGIES:
        raise SettingsError(f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={strategy!r}")
    if keras.backend.backend() == "jax":
        return _jax_run(device, strategy)
    if strategy == "multiworker":
        raise SettingsError(MULTIWORKER_ON_TENSORFLOW)
    import tensorflow as tf

    if device == "cpu":
        _hide_gpus(tf)
    gpus = tf.config.list_logical_devices("GPU")
    if device == "gpu" and not gpus:
        raise TransferkitError("--device gpu, but TensorFlow sees no GPU on this machine.")
    if strategy == "tpu" or device == "tpu" or (strategy == "auto" and device == "auto" and _tpu_address()):
        return _tpu_strategy(tf)
    if strategy == "mirrored" or (strategy == "auto" and len(gpus) >= 2):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# Keras 3 (3.16.0 included, measured) cannot `fit` under MultiWorkerMirroredStrategy: it reduces per-replica
# batches eagerly while building the model and again in its logs (keras-team/keras#20585). No version gate:
# refused until a Keras release is measured to train under it
MULTIWORKER_ON_TENSORFLOW = ("--strategy multiworker does not train on TensorFlow (Keras's fit fails under "
                             "MultiWorkerMirroredStrategy, keras-team/keras#20585); use --backend jax with "
                             "keras.distribution, the same command on every machine (README: \"Several machines\"). "
                             "Received: strategy='multiworker'")


class LocalRun:
    """What the pipelines use of a strategy, for one JAX process on its default device: one replica, no scope."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def _jax_run(device: str, strategy: str):
    import jax

    if strategy == "multiworker":  # before anything starts JAX's devices: joining the others must come first
        from transferkit.training.distributed import start

        return start(device)
    local = jax.devices("cpu") if device == "cpu" else jax.devices()
    if strategy == "mirrored" or (strategy in ("auto", "tpu") and jax.default_backend() != "cpu" and len(local) > 1):
        from transferkit.training.distributed import on_local_devices

        return on_local_devices(local)  # every local GPU or TPU core (keras.distribution.DataParallel)
    if device == "cpu":
        jax.config.update("jax_default_device", jax.devices("cpu")[0])
    elif device != "auto" and jax.default_backend() != device:
        raise TransferkitError(f"--device {device}, but JAX sees no {device.upper()} on this machine "
                               f"(it runs on {jax.default_backend()}).")
    return LocalRun()


def _hide_gpus(tf) -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialized in this process
        if tf.config.list_logical_devices("GPU"):
            raise SettingsError("--device cpu must be chosen before TensorFlow starts using the GPU.") from None


def _tpu_address() -> str | None:
    return os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or (
        "local" if os.path.exists("/dev/accel0") else None)


def _tpu_strategy(tf):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=_tpu_address() or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError) as err:
        raise TransferkitError(f"No TPU found: {str(err).splitlines()[0]}") from None
    return tf.distribute.TPUStrategy(resolver)


def set_precision(precision: str) -> None:
    """Set Keras's global dtype policy (`float32`, `mixed_float16` or `mixed_bfloat16`)."""
    import keras

    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}")
    keras.mixed_precision.set_global_policy(precision)


@contextlib.contextmanager
def training_context(recipe: Any) -> Iterator[Any]:
    """The recipe's precision policy and strategy scope, for building, compiling and fitting; yields the strategy.

    `recipe` gives `device`, `strategy` and `precision`; the previous global policy comes back on exit.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    try:
        set_precision(recipe.precision)
        strategy = resolve_strategy(recipe.device, recipe.strategy)
        with strategy.scope():
            yield strategy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def is_chief() -> bool:
    """Whether this process writes artifacts: JAX's process 0, the chief, or worker 0 of a cluster without one."""
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config.get(
        "cluster", {})
