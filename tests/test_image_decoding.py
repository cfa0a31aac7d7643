"""Plain image files decode by TensorFlow ops to the pixels Pillow gives; every other file goes through Pillow."""

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


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("channels", [3, 1])
def test_plain_files_decode_by_tensorflow_to_the_pixels_pillow_gives(tmp_path, resize, channels):
    paths = plain_kinds(tmp_path / "plain")
    if channels == 1:
        paths = [p for p in paths if "gray" in p.name]
    checked = check_images(paths, (24, 24), channels=channels, resize=resize)
    assert checked.plain.all()
    fast = ImageFiles(paths, (24, 24), channels, resize, plain=checked.plain).decode()
    pillow = read_images(paths, (24, 24), channels, resize)  # decoded and resized by Pillow alone
    assert fast.shape == pillow.shape == (len(paths), 24, 24, channels)
    np.testing.assert_array_equal(fast, pillow)


def test_plain_files_of_the_size_asked_for_never_reach_python(tmp_path, monkeypatch):
    from transferkit.data import image_ops

    paths = [p for p in plain_kinds(tmp_path / "plain") if p.name.startswith("3-") or p.name.endswith("0.jpg")]
    paths += [p for p in plain_kinds(tmp_path / "more") if p.name in ("progressive.jpg", "420.jpg")]
    checked = check_images(paths, (24, 24), channels=3)
    expected = read_images(paths, (24, 24), 3)

    def no_python(*args):
        raise AssertionError("decoded or resized in Python")

    monkeypatch.setattr(image_ops, "_fit", no_python)
    monkeypatch.setattr(image_ops, "pillow_read", no_python)
    files = ImageFiles(paths, (24, 24), 3, plain=checked.plain)
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in pipeline(files, batch_size=4)]), expected)


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


def test_a_folder_mixing_plain_and_other_files_reads_each_as_pillow_does(tmp_path):
    plain_kinds(tmp_path / "folder" / "a")
    other_kinds(tmp_path / "folder" / "b")
    data = load_data(f"dir:{tmp_path / 'folder'}", image_size=20, resize="crop", verbose=False)
    assert 0 < data.x.plain.sum() < len(data.x)
    expected = read_images(list(data.x.paths), 20, 3, "crop")
    streamed = np.concatenate([b.numpy() for b, _ in pipeline(data.x, data.y, batch_size=8)])
    np.testing.assert_array_equal(streamed, expected)
    np.testing.assert_array_equal(data.x[[3, 30]].decode(), expected[[3, 30]])
