"""Where training runs: device, `tf.distribute` strategy, precision.

`auto` picks a TPUStrategy when a TPU resolver finds one, a MirroredStrategy
with two or more GPUs, and the default strategy otherwise. `multiworker` reads
the cluster from `TF_CONFIG`. Models, optimizers and metrics are built inside
`strategy.scope()`; the global batch is `batch_size` per replica times the
number of replicas, and the learning rate is left as given (scale it yourself
with the batch if you want the linear scaling rule).

Example:

>>> from transferkit.runtime import resolve_strategy
>>> strategy = resolve_strategy("cpu", "default")
>>> strategy.num_replicas_in_sync
1
"""

from __future__ import annotations

import json
import os

from transferkit.errors import SettingsError, TransferkitError

DEVICES = ("auto", "cpu", "gpu", "tpu")
STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def resolve_strategy(device: str = "auto", strategy: str = "auto"):
    """The `tf.distribute.Strategy` for `device` and `strategy` (see the module docstring)."""
    import tensorflow as tf

    if device not in DEVICES:
        raise SettingsError(f"device must be one of {', '.join(DEVICES)}. Received: device={device!r}")
    if strategy not in STRATEGIES:
        raise SettingsError(f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={strategy!r}")
    if device == "cpu":
        _hide_gpus(tf)
    if strategy == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise SettingsError("--strategy multiworker reads the cluster from TF_CONFIG, which is not set.")
        _check_keras_multiworker()
        # collective ops must be set up before anything else starts TensorFlow
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if device == "gpu" and not gpus:
        raise TransferkitError("--device gpu, but TensorFlow sees no GPU on this machine.")
    if strategy == "tpu" or device == "tpu" or (strategy == "auto" and device == "auto" and _tpu_address()):
        return _tpu_strategy(tf)
    if strategy == "mirrored" or (strategy == "auto" and len(gpus) >= 2):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _check_keras_multiworker() -> None:
    """Keras 3 (3.15 included) cannot `fit` under MultiWorkerMirroredStrategy: it reduces per-replica
    batches eagerly while building the model and again in its logs (keras-team/keras#20585, open)."""
    import keras

    major, minor = (int(part) for part in keras.__version__.split(".")[:2])
    if (major, minor) <= (3, 15):
        raise TransferkitError(
            f"Keras {keras.__version__} cannot train under MultiWorkerMirroredStrategy (keras-team/keras#20585); "
            "use --strategy mirrored on one machine with several GPUs, or --strategy tpu."
        )


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


def is_chief() -> bool:
    """Whether this process writes artifacts: the chief, or worker 0 of a cluster without one."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config.get(
        "cluster", {})
