"""Register transferkit's Keras classes as soon as Keras is imported, without importing it ourselves.

Keras 3 finds a custom class named in a saved config only in its registry:
`serialization_lib` imports a config's `module` for Keras's own packages only,
so a model holding an `MCDropout` loads only once `transferkit.pieces.layers` has run
its `register_keras_serializable` (PITFALLS 14). `import transferkit` must
therefore register every class, yet must not import Keras (and TensorFlow):
`transferkit --help` stays instant. So `import transferkit` registers at once
when Keras is already imported, and otherwise puts a one-shot finder on
`sys.meta_path` that registers right after Keras's own import completes.

Example:

>>> import transferkit, keras                                  # either order
>>> model = keras.models.load_model("saved_models/digits-classifier/model.keras")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

# Modules whose classes (layers, schedules, optimizers) saved models may name. Registering may run in the middle
# of another transferkit module's import (the first `import keras` can be any module's), so these modules import
# from transferkit only modules that never import Keras: none of them can then meet a half-initialized module.
KERAS_OBJECT_MODULES = ("layers", "schedules", "discriminative", "backbones", "tied", "pretext_layers", "losses",
                        "augmentation")


def register_keras_objects() -> None:
    """Import every transferkit module that registers Keras objects, so saved models that use them load.

    Imports Keras (and its backend).
    """
    for name in KERAS_OBJECT_MODULES:
        try:
            importlib.import_module(f"transferkit.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"transferkit.{name}":
                raise


def register_with_keras() -> None:
    """Register now if Keras is imported, else as soon as it is (called by `import transferkit`)."""
    if "keras" in sys.modules:
        register_keras_objects()
    elif not any(isinstance(finder, _AfterKerasImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds `keras` with the other finders, and runs `register_keras_objects` once its module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_keras = spec.loader.exec_module

        def exec_module(module):
            run_keras(module)  # if Keras's import fails, stay installed for the next try
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                register_keras_objects()
            except Exception as err:  # never break `import keras`
                warnings.warn(f"transferkit could not register its Keras classes ({type(err).__name__}: {err}); "
                              "models that use them load only with transferkit.load_model.", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec
