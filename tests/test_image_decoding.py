"""Plain image files decode by TensorFlow ops to the levels Pillow gives, every other file through Pillow; all are
resized as `keras.utils.image_dataset_from_directory` resizes."""

import numpy as np
import pytest
from PIL import Image

from transferkit.data.sources import load_data, pipeline
from transferkit.data.image_files import ImageFiles
from transferkit.data.images import check_images, read_images

RNG = np.random.default_rng(7)


def photo(height, width, channels=3):
    """A smooth ramp with noise, clipped at both ends (the clipping makes resampling overshoot)."""
    ramp = np.linspace(-40, 300, width)[None, :, None] * np.ones((height, 1, channels))
    return np.clip(ramp + RNG.normal(0, 30, (height, width, channels)), 0, 255).astype(np.uint8)


def plain_kinds(folder):
    """One file of each plain kind, in sizes that need upscaling, downscaling, both, or nothing."""
    folder.mkdir(parents=True)
    sizes = [(20, 30), (50, 13), (13, 50), (24, 24), (61, 47)]
    for i, (h, w) in enumerate(sizes):
        rgb = photo(h, w)
        Image.fromarray(rgb).save(folder / f"{i}-rgb.jpg", quality=85)
        Image.fromarray(rgb).save(folder / f"{i}-rgb.png")
        Image.fromarray(rgb[..., 0]).save(folder / f"{i}-gray.jpg", quality=85)
        Image.fromarray(rgb[..., 0]).save(folder / f"{i}-gray.png")
    Image.fromarray(photo(24, 24)).save(folder / "progressive.jpg", quality=80, progressive=True)
    Image.fromarray(photo(24, 24)).save(folder / "420.jpg", quality=80, subsampling=2)
    return sorted(folder.iterdir())


KERAS_RESIZE = {"stretch": {}, "crop": {"crop_to_aspect_ratio": True}, "pad": {"pad_to_aspect_ratio": True}}


def pillow_levels(path, channels):
    """The file as Pillow decodes it (libjpeg's accurate DCT for a JPEG), as uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB" if channels == 3 else "L"))


def keras_reads(folder, images, size, channels, resize):
    """`images` (uint8 arrays) written as PNGs into `folder`, read back by Keras's own pipeline: its batch."""
    import keras

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    ds = keras.utils.image_dataset_from_directory(folder, labels=None, image_size=size, batch_size=len(images),
                                                  color_mode="rgb" if channels == 3 else "grayscale",
                                                  shuffle=False, verbose=False, **KERAS_RESIZE[resize])
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("channels", [3, 1])
def test_plain_files_are_resized_as_keras_image_dataset_from_directory_resizes(tmp_path, resize, channels):
    """Keras reads PNGs holding Pillow's decode of each file: the same levels, so the same resized pixels."""
    paths = plain_kinds(tmp_path / "plain")
    if channels == 1:
        paths = [p for p in paths if "gray" in p.name]
    checked = check_images(paths, (24, 24), channels=channels, resize=resize)
    assert checked.plain.all()
    ours = ImageFiles(paths, (24, 24), channels, resize, plain=checked.plain).decode()
    keras = keras_reads(tmp_path / "keras", [pillow_levels(p, channels) for p in paths], (24, 24), channels, resize)
    assert ours.shape == keras.shape == (len(paths), 24, 24, channels) and ours.dtype == keras.dtype == np.float32
    np.testing.assert_allclose(ours, keras, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(read_images(paths, (24, 24), channels, resize), ours)  # the in-memory reader too


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_jpegs_differ_from_keras_only_by_its_faster_dct(tmp_path, resize):
    """Keras decodes JPEGs with libjpeg's fast DCT, we with the accurate one (Pillow's). Bilinear weights are
    convex, so after resizing the two differ by at most the largest difference between the two decodes."""
    import keras
    import tensorflow as tf

    folder = tmp_path / "jpegs"
    folder.mkdir()
    paths = [p.rename(folder / p.name) for p in plain_kinds(tmp_path / "plain") if p.suffix == ".jpg"]
    ours = ImageFiles(paths, (24, 24), 3, resize, plain=np.ones(len(paths), bool)).decode()
    theirs = next(iter(keras.utils.image_dataset_from_directory(
        folder, labels=None, image_size=(24, 24), batch_size=len(paths), shuffle=False, verbose=False,
        **KERAS_RESIZE[resize]))).numpy()
    for path, mine, keras_pixels in zip(paths, ours, theirs):
        fast = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False).numpy()
        bound = np.abs(fast.astype(int) - pillow_levels(path, 3)).max()
        assert 0 < bound <= 8 and np.abs(mine - keras_pixels).max() <= bound + 1e-4


def test_plain_files_never_reach_python(tmp_path, monkeypatch):
    from transferkit.data import image_ops, images

    paths = [p for p in plain_kinds(tmp_path / "plain") if p.name.startswith("3-") or p.name.endswith("0.jpg")]
    paths += [p for p in plain_kinds(tmp_path / "more") if p.name in ("progressive.jpg", "420.jpg")]
    checked = check_images(paths, (24, 24), channels=3)

    def no_python(*args):
        raise AssertionError("decoded or resized in Python")

    for module, name in [(image_ops, "pillow_levels"), (images, "decode_image"), (images, "fit_size")]:
        monkeypatch.setattr(module, name, no_python)
    files = ImageFiles(paths, (24, 24), 3, plain=checked.plain)
    streamed = np.concatenate([b.numpy() for b in pipeline(files, batch_size=4)])
    np.testing.assert_array_equal(streamed, [pillow_levels(p, 3) for p in paths])  # all 24x24 already: untouched
    resized = ImageFiles(paths, (17, 31), 3, "crop", plain=checked.plain)  # resized in the graph, not in Python
    assert np.concatenate([b.numpy() for b in pipeline(resized, batch_size=4)]).shape == (len(paths), 17, 31, 3)


def other_kinds(folder):
    """Files only Pillow reads with their true levels, each with the reason it is not plain."""
    folder.mkdir(parents=True)
    rgb = photo(12, 16)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    files = {
        "palette.png": lambda p: palette.save(p),
        "palette.gif": lambda p: palette.save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(p),
        "la.png": lambda p: Image.merge("LA", [Image.fromarray(rgb[..., 0])] * 2).save(p),
        "deep.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p),
        "two-bit.png": lambda p: Image.fromarray(rgb[..., 0] // 64 * 85).save(p, bits=2),
        "transparent.png": lambda p: Image.fromarray(rgb).save(p, transparency=(0, 0, 0)),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "turned.jpg": lambda p: Image.fromarray(rgb).save(p, exif=exif),
        "rgb.bmp": lambda p: Image.fromarray(rgb).save(p),
        "rgb.tif": lambda p: Image.fromarray(rgb).save(p),
        "png-named.jpg": lambda p: Image.fromarray(rgb).save(p, format="PNG"),  # tf.io is given one decoder by suffix
        "jpeg-named.png": lambda p: Image.fromarray(rgb).save(p, format="JPEG"),
    }
    for name, save in files.items():
        save(folder / name)
    return [folder / name for name in files]


def test_only_plain_files_are_marked_plain(tmp_path):
    plain = plain_kinds(tmp_path / "plain")
    others = other_kinds(tmp_path / "others")
    checked = check_images(plain + others, (12, 16), channels=3)
    assert checked.plain.tolist() == [True] * len(plain) + [False] * len(others)
    gray_into_gray = check_images([p for p in plain if "gray" in p.name], channels=1)
    rgb_into_gray = check_images([p for p in plain if "rgb" in p.name], channels=1)
    assert gray_into_gray.plain.all() and not rgb_into_gray.plain.any()  # RGB to gray is Pillow's luma


def test_a_folder_mixing_plain_and_other_files_resizes_each_as_keras_does(tmp_path):
    import keras

    plain_kinds(tmp_path / "folder" / "a")
    other_kinds(tmp_path / "folder" / "b")
    data = load_data(f"dir:{tmp_path / 'folder'}", image_size=20, resize="crop", verbose=False)
    assert 0 < data.x.plain.sum() < len(data.x)
    # each file's levels at its own size (the modes' tests check them), cropped and resized by Keras
    expected = np.stack([keras.preprocessing.image.smart_resize(read_images([p], channels=3)[0], (20, 20))
                         for p in data.x.paths])
    streamed = np.concatenate([b.numpy() for b, _ in pipeline(data.x, data.y, batch_size=8)])
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(data.x[[3, 30]].decode(), streamed[[3, 30]])


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_other_modes_resize_like_the_same_picture_in_8_bit(tmp_path, resize):
    """Decoded by Pillow to float levels, resized in the graph: the pixels of the 8-bit picture, within rounding."""
    rgb = photo(12, 16)
    gray = rgb[..., 0]
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit, the same levels
    Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)])).save(folder / "opaque-rgba.png")
    Image.merge("LA", [Image.fromarray(gray), Image.new("L", (16, 12), 255)]).save(folder / "opaque-la.png")
    Image.fromarray(rgb).save(folder / "rgb.tif")
    others = sorted(folder.iterdir())
    checked = check_images(others, (20, 20), channels=3, resize=resize)
    assert not checked.plain.any()
    ours = ImageFiles(others, (20, 20), 3, resize, plain=checked.plain).decode()
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    keras = keras_reads(tmp_path / "keras", [gray3, gray3, rgb, rgb], (20, 20), 3, resize)
    np.testing.assert_allclose(ours, keras, rtol=0, atol=1e-3)
