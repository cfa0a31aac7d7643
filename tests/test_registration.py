"""`import transferkit` registers every Keras class, before or after Keras is imported, without importing it."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import transferkit as tk

PACKAGE = Path(tk.__file__).parent


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def modules_that_register() -> list[str]:
    """Every transferkit module whose source registers a Keras class (read from the files, not the code under test)."""
    return sorted(f"transferkit.{p.stem}" for p in PACKAGE.glob("*.py")
                  if re.search(r"register_keras_serializable\(", p.read_text()) and p.stem != "registration")


def transferkit_imports(module: str) -> set[str]:
    """The transferkit modules that `module`'s source imports at its top level."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
            names |= {node.module} if node.module != "transferkit" else {f"transferkit.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("transferkit.")}
    return {name.split(".")[1] for name in names if (PACKAGE / f"{name.split('.')[1]}.py").is_file()}


def imports_keras(module: str) -> bool:
    source = (PACKAGE / f"{module}.py").read_text()
    return bool(re.search(r"^(import keras|from keras)", source, re.M)) or any(
        imports_keras(m) for m in transferkit_imports(module))


def test_registering_modules_import_no_transferkit_module_that_imports_keras():
    # registering can run mid-import of any module that imports keras; such a module must not be imported then
    from transferkit.registration import KERAS_OBJECT_MODULES

    assert {m.removeprefix("transferkit.") for m in modules_that_register()} <= set(KERAS_OBJECT_MODULES)
    for module in KERAS_OBJECT_MODULES:
        assert [m for m in transferkit_imports(module) if imports_keras(m)] == [], module


@pytest.mark.parametrize("imports", [
    "import transferkit; import keras",
    "import keras; import transferkit",
    "import transferkit.pretraining.train",  # keras is first imported half-way through it
])
def test_import_transferkit_registers_every_serializable_class(imports):
    modules = modules_that_register()
    assert {"transferkit.pieces.layers", "transferkit.pieces.schedules", "transferkit.pieces.discriminative"} <= set(modules)
    code = (
        "import warnings; warnings.filterwarnings('error', message='transferkit could not')\n"
        f"{imports}\n"
        "import importlib, json, keras\n"
        "names = lambda: {k for k in keras.saving.get_custom_objects() if k.startswith('transferkit>')}\n"
        "registered = names()\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps({'missing': sorted(names() - registered), 'registered': len(registered)}))\n"
    )
    out = json.loads(run_python(code))
    assert out["missing"] == []
    assert out["registered"] >= 3


def test_plain_keras_loads_a_model_built_from_transferkit_pieces(tmp_path):
    inputs = keras.Input((6,))
    hidden = tk.RReLU(lower=0.1, upper=0.3, name="rrelu")(keras.layers.Dense(5, name="hidden_dense")(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(tk.MCDropout(0.2, name="mc")(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Nadam(tk.OneCycle(total_steps=4, max_lr=0.01)),
                  loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype("float32")
    model.fit(x, rng.integers(0, 3, size=8), epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    # RReLU at inference: the mean slope (0.1 + 0.3) / 2 on the negative side, computed here with numpy
    kernel, bias = model.get_layer("hidden_dense").get_weights()
    pre = x @ kernel + bias
    expected = np.where(pre >= 0, pre, 0.2 * pre)

    code = (
        "import json, numpy as np, keras, transferkit\n"
        f"m = keras.models.load_model({str(tmp_path / 'model.keras')!r})\n"
        "hidden = keras.Model(m.input, m.get_layer('rrelu').output)\n"
        f"x = np.array({x.tolist()!r}, 'float32')\n"
        "lr = m.optimizer.get_config()['learning_rate']\n"
        "print(json.dumps({'layers': [type(l).__name__ for l in m.layers], 'schedule': lr['class_name'],\n"
        "                  'max_lr': lr['config']['max_lr'], 'iterations': int(m.optimizer.iterations),\n"
        "                  'hidden': keras.ops.convert_to_numpy(hidden(x, training=False)).tolist()}))\n"
    )
    out = json.loads(run_python(code))
    assert out["layers"] == ["InputLayer", "Dense", "RReLU", "MCDropout", "Dense"]
    assert (out["schedule"], out["max_lr"], out["iterations"]) == ("OneCycle", 0.01, 1)
    np.testing.assert_allclose(out["hidden"], expected, rtol=1e-5, atol=1e-6)
