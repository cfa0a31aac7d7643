import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

# Tiny settings that keep the default test run quick.
TINY = dict(epochs=2, batch_size=64, units=(16, 8, 4), verbose=False)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny denoising SELU encoder pretrained on the digits."""
    import transferkit as tk

    out = tmp_path_factory.mktemp("artifacts") / "encoder"
    # gaussian noise, not the default masking: the overfitting and resume tests were set up on this encoder
    return tk.pretrain(data="digits", task="denoising", noise_kind="gaussian", out=str(out), **TINY).artifact


@pytest.fixture(scope="session")
def bn_encoder_dir(tmp_path_factory):
    """A tiny ReLU encoder with BatchNorm after each activation."""
    import transferkit as tk

    out = tmp_path_factory.mktemp("artifacts") / "bn-encoder"
    return tk.pretrain(data="digits", activation="relu", batchnorm="after", noise_kind="gaussian", out=str(out),
                       **TINY).artifact


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, encoder_dir):
    import transferkit as tk

    out = tmp_path_factory.mktemp("artifacts") / "classifier"
    return tk.finetune(from_=str(encoder_dir), label_fraction=0.1, head_epochs=2, epochs=2, unfreeze_top=1,
                       dropout=0.0, out=str(out), verbose=False).artifact


@pytest.fixture(scope="session")
def dropout_classifier_dir(tmp_path_factory, bn_encoder_dir):
    """A classifier on the BatchNorm encoder with dropout before its head."""
    import transferkit as tk

    out = tmp_path_factory.mktemp("artifacts") / "dropout-classifier"
    return tk.finetune(from_=str(bn_encoder_dir), label_fraction=0.2, head_epochs=3, epochs=1, unfreeze_top=1,
                       dropout=0.3, lr=0.01, out=str(out), verbose=False).artifact


@pytest.fixture
def no_whole_decoding(monkeypatch):
    """Converting image files to one array raises; decoding a few on purpose (pictures) is counted."""
    from transferkit.data.image_files import ImageFiles

    decoded = []

    def refuse(self, dtype=None, copy=None):
        raise AssertionError(f"{len(self)} images decoded into one array")

    original = ImageFiles.decode

    def counted(self):
        decoded.append(len(self))
        return original(self)

    monkeypatch.setattr(ImageFiles, "__array__", refuse)
    monkeypatch.setattr(ImageFiles, "decode", counted)
    return decoded
