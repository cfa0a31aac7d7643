"""Activation setups and the stacks built from them (the chapter's table)."""

import warnings

import keras
import numpy as np
import pytest

from transferkit.errors import SettingsError
from transferkit.pieces.setups import ACTIVATION_SETUPS, conv_stack, dense_stack, setup_for
from tests.helpers import assert_reloads_with_same_outputs

pytestmark = pytest.mark.backend_neutral  # also run on JAX by `make test-jax`


@pytest.mark.parametrize("activation, initializer", [
    ("selu", "lecun_normal"),
    *[(a, "he_normal") for a in ("relu", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "swish", "mish")],
    *[(a, "glorot_uniform") for a in ("tanh", "sigmoid", "softmax", "linear")],
])
def test_each_activation_gets_the_chapters_initializer(activation, initializer):
    setup = setup_for(activation)
    assert setup.initializer == initializer
    assert setup.dropout == ("alpha" if activation == "selu" else "plain")
    assert setup.batchnorm == (activation != "selu")
    layers = dense_stack([4], activation=activation, dropout=0.1)
    assert layers[0].kernel_initializer.__class__.__name__ == keras.initializers.get(initializer).__class__.__name__


def test_unknown_activation_names_the_choices():
    with pytest.raises(SettingsError, match=r"Unknown activation 'relu6'.*Received: activation='relu6'"):
        setup_for("relu6")


def test_selu_stack_uses_alpha_dropout_and_others_plain():
    assert isinstance(dense_stack([4], "selu", dropout=0.2)[-1], keras.layers.AlphaDropout)
    assert type(dense_stack([4], "relu", dropout=0.2)[-1]) is keras.layers.Dropout


def kinds(layers):
    return [type(layer).__name__ for layer in layers]


def test_batchnorm_before_means_dense_without_bias_then_bn_then_activation():
    layers = dense_stack([8], activation="elu", batchnorm="before")
    assert kinds(layers) == ["Dense", "BatchNormalization", "Activation"]
    assert layers[0].use_bias is False
    after = dense_stack([8], activation="elu", batchnorm="after")
    assert kinds(after) == ["Dense", "Activation", "BatchNormalization"] and after[0].use_bias


def count(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable + frozen, trainable, frozen


def test_parameter_counts_of_the_chapters_batchnorm_models():
    after = keras.Sequential([keras.Input((64,)), keras.layers.BatchNormalization(),
                              *dense_stack([300, 100], activation="relu", batchnorm="after"),
                              keras.layers.Dense(10, activation="softmax")])
    assert count(after) == (52_466, 51_538, 928)
    before = keras.Sequential([keras.Input((64,)),
                               *dense_stack([300, 100], activation="relu", batchnorm="before"),
                               keras.layers.Dense(10, activation="softmax")])
    assert count(before) == (51_810, 51_010, 800)


def test_a_deep_selu_stack_self_normalizes_and_a_sigmoid_one_saturates():
    x = np.random.default_rng(42).standard_normal((500, 100)).astype("float32")
    keras.utils.set_random_seed(42)
    selu = dense_stack([100] * 100, activation="selu")
    out = x
    for i, layer in enumerate(selu, start=1):
        out = layer(out)
        if i % 20 == 0:  # each block is Dense + activation: every 10th block
            a = keras.ops.convert_to_numpy(out)
            assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.2, (i // 2, a.mean(), a.std())
    out = x
    saturated = []
    for _ in range(100):
        out = keras.layers.Dense(100, activation="sigmoid",
                                 kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))(out)
        a = keras.ops.convert_to_numpy(out)
        saturated.append(float(np.mean((a < 0.01) | (a > 0.99))))
    print("sigmoid + N(0, 1): saturated fraction at layers 10, 50, 100:", saturated[9], saturated[49], saturated[99])
    assert min(saturated[9:]) > 0.3


def test_selu_with_batchnorm_warns_once_what_breaks_and_what_instead():
    import transferkit.pieces.setups as setups

    setups._warned.clear()
    with pytest.warns(UserWarning, match="SELU with BatchNorm breaks self-normalization; use batchnorm=None"):
        dense_stack([4], "selu", batchnorm="after")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense_stack([4], "selu", batchnorm="after")  # only once
    with pytest.warns(UserWarning, match="max-norm"):
        dense_stack([4], "selu", max_norm=2.0)


def test_conv_stack_blocks_pool_and_keep_names():
    layers = conv_stack([4, 8], activation="relu", batchnorm="after", name="enc_")
    assert [l.name for l in layers][:4] == ["enc_block1_conv2d", "enc_block1_act", "enc_block1_bn", "enc_block1_pool"]
    model = keras.Sequential([keras.Input((8, 8, 1)), *layers])
    assert model(np.zeros((1, 8, 8, 1), "float32")).shape == (1, 2, 2, 8)


def test_stack_with_every_option_fits_digits_and_reloads(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = ((digits.data - digits.data.mean()) / digits.data.std()).astype("float32")
    model = keras.Sequential([keras.Input((64,)),
                              *dense_stack([64, 32], activation="elu", batchnorm="before", dropout=0.1,
                                           max_norm=2.0, kernel_regularizer=keras.regularizers.L2(1e-4)),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="nadam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = model.evaluate(x, digits.target, verbose=0)[1]
    model.fit(x, digits.target, epochs=3, verbose=0)
    after = model.evaluate(x, digits.target, verbose=0)[1]
    assert after > before + 0.3
    assert_reloads_with_same_outputs(model, x[:16], tmp_path)
