"""Keras and our code against the reference values of REFERENCE.md (papers and chapter)."""

import math

import keras
import numpy as np
import pytest

from transferkit.pieces.layers import MCAlphaDropout
from transferkit.pieces.optimizers import optimizer

pytestmark = pytest.mark.backend_neutral  # also run on JAX by `make test-jax`

SELU_ALPHA = 1.6732632423543772848
SELU_SCALE = 1.0507009873554804934
ALPHA_PRIME = -1.7580993408473766


def test_keras_selu_uses_the_papers_constants():
    # selu(1) = scale; selu(x) -> -scale * alpha = alpha' as x -> -inf.
    y = keras.ops.convert_to_numpy(keras.activations.selu(np.array([1.0, -100.0], "float64")))
    assert y[0] == pytest.approx(SELU_SCALE, rel=1e-12)
    assert y[1] == pytest.approx(-SELU_SCALE * SELU_ALPHA, rel=1e-12)
    assert y[1] == pytest.approx(ALPHA_PRIME, rel=1e-12)


def test_mc_alpha_dropout_applies_the_papers_affine_map_at_inference():
    q = 0.2
    a = ((1 - q) * (1 + q * ALPHA_PRIME**2)) ** -0.5
    b = -a * ALPHA_PRIME * q
    x = np.random.default_rng(0).standard_normal((400, 50)).astype("float32")
    y = keras.ops.convert_to_numpy(MCAlphaDropout(q, seed=1)(x, training=False))
    dropped = np.isclose(y, a * ALPHA_PRIME + b, atol=1e-6)
    assert dropped.mean() == pytest.approx(q, abs=0.02)
    np.testing.assert_allclose(y[~dropped], a * x[~dropped] + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q", [0.1, 0.3])
def test_mc_alpha_dropout_keeps_standardized_inputs_at_mean_0_variance_1(q):
    # 200k samples: the sampling error of the mean and variance is ~0.003.
    x = np.random.default_rng(1).standard_normal((2000, 100)).astype("float32")
    y = keras.ops.convert_to_numpy(MCAlphaDropout(q, seed=2)(x, training=False))
    assert abs(y.mean()) < 0.02
    assert y.var() == pytest.approx(1.0, abs=0.03)
    assert not np.allclose(y, x)  # it did drop at inference


FAN_IN, FAN_OUT = 400, 1600  # unequal fans tell fan_in from fan_avg
# initializer -> (scale, n) of Keras's variance scaling
VARIANCE_SCALING = {
    "glorot_normal": (1.0, (FAN_IN + FAN_OUT) / 2),
    "glorot_uniform": (1.0, (FAN_IN + FAN_OUT) / 2),
    "he_normal": (2.0, FAN_IN),
    "he_uniform": (2.0, FAN_IN),
    "lecun_normal": (1.0, FAN_IN),
    "lecun_uniform": (1.0, FAN_IN),
}


@pytest.mark.parametrize("name", sorted(VARIANCE_SCALING))
def test_initializer_std_matches_variance_scaling(name):
    scale, n = VARIANCE_SCALING[name]
    initializer = keras.initializers.get({"class_name": name, "config": {"seed": 7}})
    w = keras.ops.convert_to_numpy(initializer((FAN_IN, FAN_OUT)))
    # Truncated normal with stddev sqrt(scale/n)/0.8796... and uniform with limit
    # sqrt(3*scale/n) both have standard deviation sqrt(scale/n).
    assert w.std() == pytest.approx(math.sqrt(scale / n), rel=0.02)
    if name.endswith("uniform"):
        bound = math.sqrt(3 * scale / n)
    else:
        bound = 2 * math.sqrt(scale / n) / 0.87962566103423978  # truncated at 2 stddev
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.99 * bound


@pytest.mark.parametrize(
    "clipping, expected",
    [({"clipnorm": 1.0}, [0.00899964, 0.9999595]), ({"clipvalue": 1.0}, [0.9, 1.0])],
)
def test_gradient_clipping_matches_reference(clipping, expected):
    var = keras.Variable(np.zeros(2, "float32"))
    opt = optimizer("sgd", learning_rate=1.0, **clipping)
    opt.apply_gradients([(keras.ops.convert_to_tensor(np.array([0.9, 100.0], "float32")), var)])
    # One plain SGD step at lr 1 moves the variable by minus the clipped gradient.
    np.testing.assert_allclose(-keras.ops.convert_to_numpy(var), expected, rtol=1e-5)
