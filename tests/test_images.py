"""Image folders: listing, every mode read with its true levels, one size, bad files named."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data.sources import load_data
from transferkit.errors import SettingsError
from transferkit.data.image_listing import list_images
from transferkit.data.images import check_images, fit_size, read_images

from helpers import run

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def pixels(shape, high=256, dtype=np.uint8):
    return RNG.integers(0, high, shape).astype(dtype)


def saved(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def read_one(path, channels=None):
    return read_images([path], channels=channels)[0]


def test_listing_sorts_classes_and_files_and_counts_what_it_leaves_out(tmp_path):
    for name in ("dog/b.png", "dog/a.PNG", "dog/2020/c.jpg", "cat/z.gif", "cat/notes.txt", "cat/.DS_Store",
                 "cat/._z.gif", "cat/.cache/d.png", "README.md", "loose.png", ".hidden.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".git").mkdir()
    listing = list_images(tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in listing.files] == ["cat/z.gif", "dog/2020/c.jpg", "dog/a.PNG",
                                                                     "dog/b.png"]
    assert listing.class_names == ("cat", "dog") and listing.labels == (0, 1, 1, 1)
    # hidden: .DS_Store, ._z.gif, .cache/, .hidden.png, .git/; non-image: notes.txt, README.md
    assert (listing.hidden, listing.non_image, listing.outside) == (5, 2, 1)


def test_summary_line_counts_images_classes_and_skipped(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            saved(tmp_path / c / f"{i}.png", Image.fromarray(pixels((4, 4))))
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "b" / "labels.csv").write_text("x")
    (tmp_path / "b" / "broken.png").write_bytes(b"")
    data = load_data(f"dir:{tmp_path}", skip_bad_files=True)
    line = capsys.readouterr().err.strip()
    assert line == f"dir:{tmp_path}: 4 images, 2 classes, 3 skipped (1 hidden, 1 non-image, 1 bad): b/broken.png"
    assert data.skipped == (str(tmp_path / "b" / "broken.png"),)


# ---- every mode, compared with the same picture as 8-bit RGB or gray, computed with numpy


def test_16_bit_gray_is_scaled_to_the_8_bit_range(tmp_path):
    deep = pixels((6, 5), 65536, np.uint16)
    read = read_one(saved(tmp_path / "deep.png", Image.fromarray(deep)))
    eight_bit = read_one(saved(tmp_path / "eight.png", Image.fromarray(np.round(deep / 257).astype(np.uint8))))
    assert read.shape == (6, 5, 1)
    np.testing.assert_allclose(read[..., 0], deep.astype(float) * 255 / 65535, atol=1e-3)
    np.testing.assert_allclose(read, eight_bit, atol=0.5 + 1e-3)


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.usefixtures("tmp")
def test_1_bit_is_black_and_white():
    bits = pixels((5, 7), 2).astype(bool)
    np.testing.assert_array_equal(read_images_of(Image.fromarray(bits), "bits.png")[..., 0], bits * 255.0)


def read_images_of(image, name, **save):
    image.save(name, **save)
    return read_one(Path(name))


@pytest.mark.usefixtures("tmp")
def test_rgb_and_gray_are_read_as_stored():
    rgb, gray = pixels((5, 6, 3)), pixels((5, 6))
    np.testing.assert_array_equal(read_images_of(Image.fromarray(rgb), "rgb.png"), rgb)
    np.testing.assert_array_equal(read_images_of(Image.fromarray(gray), "gray.png")[..., 0], gray)
    np.testing.assert_array_equal(read_images_of(Image.fromarray(rgb), "rgb.bmp"), rgb)
    np.testing.assert_array_equal(read_images_of(Image.fromarray(rgb), "rgb.tif"), rgb)


@pytest.mark.usefixtures("tmp")
def test_alpha_is_composited_on_white():
    rgb, alpha = pixels((5, 6, 3)), pixels((5, 6))
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255 * (1 - a)
    np.testing.assert_allclose(read_images_of(Image.fromarray(np.dstack([rgb, alpha])), "rgba.png"), expected,
                               atol=1e-3)
    opaque = np.dstack([rgb, np.full((5, 6), 255, np.uint8)])
    np.testing.assert_allclose(read_images_of(Image.fromarray(opaque), "opaque.png"),
                               read_images_of(Image.fromarray(rgb), "same.png"), atol=1e-4)
    gray = pixels((5, 6))
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    np.testing.assert_allclose(read_images_of(la, "la.png")[..., 0], gray * a[..., 0] + 255 * (1 - a[..., 0]),
                               atol=1e-3)


def palette_image(indices, palette):
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    return image


@pytest.mark.usefixtures("tmp")
def test_palette_images_read_through_their_palette_and_transparency():
    palette, indices = pixels((256, 3)), pixels((6, 7), 8)
    np.testing.assert_array_equal(read_images_of(palette_image(indices, palette), "p.png"), palette[indices])
    expected = np.where((indices == 3)[..., None], 255.0, palette[indices])
    np.testing.assert_allclose(read_images_of(palette_image(indices, palette), "pt.png", transparency=3), expected,
                               atol=1e-4)


@pytest.mark.usefixtures("tmp")
def test_cmyk_reads_as_the_rgb_it_prints():
    cmyk = pixels((5, 6, 4))
    expected = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255
    np.testing.assert_allclose(read_images_of(Image.fromarray(cmyk, mode="CMYK"), "c.tif"), expected, atol=1e-3)
    rgb = pixels((5, 6, 3))
    np.testing.assert_allclose(read_images_of(Image.fromarray(rgb).convert("CMYK"), "rgb-as-cmyk.tif"), rgb,
                               atol=1e-3)


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])  # np.rot90 turns, counterclockwise
def test_exif_orientation_turns_jpegs_upright(tmp_path, orientation, turns):
    stored = np.kron(pixels((4, 6, 3)), np.ones((4, 4, 1), np.uint8))  # 16x24 blocks survive JPEG
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(tmp_path / "photo.jpg", Image.fromarray(stored), exif=exif, quality=95)
    with Image.open(path) as im:
        as_stored = np.asarray(im.convert("RGB"))  # the raw decode, not turned
    np.testing.assert_array_equal(read_one(path), np.rot90(as_stored, turns))


def test_exif_turned_size_is_known_before_decoding(tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6
    saved(tmp_path / "a.jpg", Image.fromarray(pixels((20, 30, 3))), exif=exif)  # shown 30 high, 20 wide
    saved(tmp_path / "b.png", Image.fromarray(pixels((30, 20, 3))))
    data = load_data(f"dir:{tmp_path}")
    assert data.input_shape == (30, 20, 3)
    assert "resized" not in capsys.readouterr().err


def test_animated_gif_reads_its_first_frame(tmp_path):
    palette = pixels((256, 3))
    first, second = pixels((6, 7), 16), pixels((6, 7), 16)
    path = tmp_path / "anim.gif"
    palette_image(first, palette).save(path, save_all=True, append_images=[palette_image(second, palette)])
    with Image.open(path) as im:
        assert im.n_frames == 2
    np.testing.assert_array_equal(read_one(path), palette[first])


def test_a_folder_is_gray_only_when_every_image_is(tmp_path):
    gray, rgb = pixels((5, 6)), pixels((5, 6, 3))
    saved(tmp_path / "a.png", Image.fromarray(gray))
    saved(tmp_path / "b.png", Image.fromarray(pixels((5, 6), 65536, np.uint16)))
    assert load_data(f"dir:{tmp_path}", verbose=False).input_shape == (5, 6, 1)
    saved(tmp_path / "c.png", Image.fromarray(rgb))
    data = load_data(f"dir:{tmp_path}", verbose=False)
    assert data.input_shape == (5, 6, 3)
    np.testing.assert_array_equal(data.x[0], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(data.x[2], rgb)


# ---- one size


def test_mixed_sizes_are_resized_to_the_median_size(tmp_path, capsys):
    sizes = [(8, 8), (12, 10), (20, 6), (9, 30)]  # (height, width)
    for i, (h, w) in enumerate(sizes):
        saved(tmp_path / f"{i}.png", Image.fromarray(pixels((h, w))))
    data = load_data(f"dir:{tmp_path}")
    lower_median = lambda values: sorted(values)[(len(values) - 1) // 2]  # noqa: E731
    expected = (lower_median([h for h, _ in sizes]), lower_median([w for _, w in sizes]))
    assert expected == (9, 8) and data.input_shape == expected + (1,)
    assert "resized to 9x8 (height x width: the median size)" in capsys.readouterr().err
    assert load_data(f"dir:{tmp_path}", image_size=6, verbose=False).input_shape == (6, 6, 1)


def test_a_default_size_over_224_a_side_is_scaled_down_keeping_its_aspect(tmp_path, capsys):
    # phone-sized photos would give an encoder with millions of weights per unit: the default stops at 224 a side
    mixed, same = tmp_path / "mixed", tmp_path / "same"
    mixed.mkdir()
    same.mkdir()
    for i, (h, w) in enumerate([(300, 400), (600, 800), (240, 320)]):
        saved(mixed / f"{i}.png", Image.fromarray(pixels((h, w))))
        saved(same / f"{i}.png", Image.fromarray(pixels((300, 400))))
    expected = (round(300 * 224 / 400), 224)  # the lower median (300, 400), its longer side to 224
    assert load_data(f"dir:{mixed}").input_shape == expected + (1,)
    assert "all resized to 168x224 (height x width: the median size 300x400 scaled to 224" in capsys.readouterr().err
    assert load_data(f"dir:{same}").input_shape == expected + (1,)
    assert "all resized to 168x224 (height x width: their size 300x400 scaled to 224" in capsys.readouterr().err
    assert load_data(f"dir:{same}", image_size=(300, 400), verbose=False).input_shape == (300, 400, 1)


KERAS_RESIZE = {"stretch": {}, "crop": {"crop_to_aspect_ratio": True}, "pad": {"pad_to_aspect_ratio": True}}


def keras_reads(folder, image, size, resize):
    """`image` (uint8, `(H, W, 1 or 3)`) as `keras.utils.image_dataset_from_directory` reads it from a PNG."""
    import keras

    folder.mkdir()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / "0.png")
    ds = keras.utils.image_dataset_from_directory(folder, labels=None, image_size=size, shuffle=False, verbose=False,
                                                  color_mode="grayscale" if image.shape[-1] == 1 else "rgb",
                                                  **KERAS_RESIZE[resize])
    return next(iter(ds)).numpy()[0]


@pytest.mark.parametrize("resize, shape, size", [
    ("crop", (20, 10), (10, 10)), ("crop", (21, 10), (10, 10)), ("crop", (10, 21), (10, 7)),
    ("crop", (9, 30), (9, 5)), ("pad", (20, 10), (20, 20)), ("pad", (10, 21), (16, 21)), ("pad", (9, 30), (15, 30)),
])
def test_crop_and_pad_take_keras_boxes(tmp_path, resize, shape, size):
    """Sizes at which Keras's box needs no resampling, odd margins included: the pixels must match exactly."""
    image = pixels(shape + (3,))
    expected = keras_reads(tmp_path / "keras", image, size, resize)
    np.testing.assert_array_equal(fit_size(image.astype("float32"), size, resize), expected)


def test_pad_with_an_odd_margin_puts_the_larger_margin_after_as_keras_does(tmp_path):
    """21x10 padded to 21x21 (`tf.image.resize_with_pad`): 5 black columns before, 6 after, nothing resampled."""
    ramp = np.tile(20 * np.arange(10, dtype=np.uint8) + 30, (21, 1))[..., None]
    ours = fit_size(ramp, (21, 21), "pad")
    np.testing.assert_array_equal(ours, np.pad(ramp, ((0, 0), (5, 6), (0, 0))))
    np.testing.assert_array_equal(ours, keras_reads(tmp_path / "keras", ramp, (21, 21), "pad"))


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_a_folder_is_resized_as_keras_reads_it(tmp_path, resize):
    rows, cols = np.mgrid[0:40, 0:60]
    ramp = (2 * cols + 3 * rows + 20).astype(np.uint8)
    (tmp_path / "folder").mkdir()
    x = load_data(f"dir:{saved(tmp_path / 'folder' / 'ramp.png', Image.fromarray(ramp)).parent}", image_size=16,
                  resize=resize, verbose=False).x[0]
    expected = keras_reads(tmp_path / "keras", ramp[..., None], (16, 16), resize)
    assert x.shape == expected.shape == (16, 16, 1)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-4)
    if resize == "pad":  # 40x60 fitted into 16x16 is 10.67 high: 10 rows, 2 black rows above and 4 below
        assert x[:2].max() == 0 and x[-4:].max() == 0 and x[2:12].min() > 0


# ---- bad files


def bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / "whole.jpg"
    Image.fromarray(pixels((32, 32, 3))).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not a picture\n")
    return {"truncated.jpg": "image file is truncated", "empty.png": "the file is empty (0 bytes)",
            "text.png": "not an image Pillow can read"}


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.png", "text.png"])
def test_a_bad_file_is_refused_naming_path_and_reason(tmp_path, name):
    reasons = bad_files(tmp_path / "src")
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(pixels((32, 32, 3))).save(folder / "good.png")
    (folder / name).write_bytes((tmp_path / "src" / name).read_bytes())
    with pytest.raises(SettingsError) as err:
        load_data(f"dir:{folder}", verbose=False)
    message = str(err.value)
    assert message.startswith(f"Image {str(folder / name)!r} cannot be read: ") and "\n" not in message
    assert reasons[name] in message and "--skip-bad-files" in message


JPEG_KINDS = [{}, {"progressive": True}, {"comment": b"\xff\xd9 an end marker in a comment"}]


@pytest.mark.parametrize("save", JPEG_KINDS)
@pytest.mark.parametrize("kept", [0.6, 0.9])
def test_a_jpeg_cut_short_is_refused(tmp_path, save, kept):
    """The check decodes no pixel of a whole JPEG, so it must tell a cut one otherwise: with Pillow's reason."""
    whole = saved(tmp_path / "whole.jpg", Image.fromarray(pixels((64, 64, 3))), quality=90, **save)
    data = whole.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:int(len(data) * kept)])
    with pytest.raises(SettingsError, match=r"cut\.jpg' cannot be read: OSError: image file is truncated"):
        check_images([whole, tmp_path / "cut.jpg"])


def test_a_jpeg_without_its_end_marker_is_refused_or_left_to_pillow(tmp_path):
    """All but the last two bytes (0xFFD9): tf.io refuses every such file, Pillow some (by how its reads fall).
    Each is then refused with Pillow's reason, or decoded by Pillow: the pipeline never meets one it cannot read."""
    from transferkit.data.image_files import ImageFiles

    outcomes = set()
    for seed in range(20):  # seed 16 gives a file Pillow reads whole
        image = np.random.default_rng(seed).integers(0, 256, (64, 64, 3)).astype(np.uint8)
        whole = saved(tmp_path / f"{seed}.jpg", Image.fromarray(image), quality=90)
        cut = tmp_path / f"{seed}-cut.jpg"
        cut.write_bytes(whole.read_bytes()[:-2])
        checked = check_images([whole, cut], skip_bad_files=True)
        if checked.bad:
            assert len(checked.bad) == 1 and checked.bad[0][0] == str(cut)
            assert "image file is truncated" in checked.bad[0][1]
        else:
            assert checked.plain.tolist() == [True, False]
            decoded = ImageFiles([whole, cut], (64, 64), 3, plain=checked.plain).decode()
            np.testing.assert_array_equal(decoded[1], np.asarray(Image.open(whole)))  # the same pixels, all there
        outcomes.add(bool(checked.bad))
    assert outcomes == {True, False}


def test_a_png_cut_short_or_corrupted_is_refused(tmp_path):
    whole = saved(tmp_path / "whole.png", Image.fromarray(pixels((64, 64, 3))))
    data = whole.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:int(len(data) * 0.7)])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10  # inside the pixel data: its chunk's CRC no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    checked = check_images([whole, tmp_path / "cut.png", tmp_path / "flipped.png"], skip_bad_files=True)
    assert checked.kept.tolist() == [0]
    assert [(Path(path).name, "truncated" in why.lower() or "checksum" in why) for path, why in checked.bad] == [
        ("cut.png", True), ("flipped.png", True)]


def test_the_check_decodes_no_pixel_of_a_whole_jpeg_or_png(tmp_path, monkeypatch):
    from PIL import ImageFile

    rgb = pixels((40, 30, 3))
    paths = [saved(tmp_path / "a.jpg", Image.fromarray(rgb)), saved(tmp_path / "b.png", Image.fromarray(rgb)),
             saved(tmp_path / "c.jpg", Image.fromarray(rgb[..., 0]), progressive=True),
             saved(tmp_path / "d.png", Image.fromarray(rgb[..., 0]))]

    def decode(self):
        raise AssertionError("the check decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    checked = check_images(paths)
    assert checked.plain.all() and checked.size == (40, 30) and checked.channels == 3


def test_skip_bad_files_keeps_the_rest_with_their_labels(tmp_path):
    bad_files(tmp_path / "b")
    (tmp_path / "a").mkdir()
    good = pixels((32, 32, 3))
    Image.fromarray(good).save(tmp_path / "a" / "0.png")
    data = load_data(f"dir:{tmp_path}", skip_bad_files=True, verbose=False)
    assert data.skipped == tuple(str(tmp_path / "b" / n) for n in ("empty.png", "text.png", "truncated.jpg"))
    assert len(data.x) == 2 and data.y.tolist() == [0, 1] and data.class_names == ("a", "b")
    np.testing.assert_array_equal(data.x[0], good)


def test_a_class_left_without_images_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels((4, 4))).save(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "0.png").write_bytes(b"")
    with pytest.raises(SettingsError, match=r"Class folder '.*b' holds no image that can be read"):
        load_data(f"dir:{tmp_path}", skip_bad_files=True, verbose=False)


def test_cli_names_the_bad_file_and_exits_2(tmp_path):
    bad_files(tmp_path / "data" / "x")
    result = run("pretrain", "--data", f"dir:{tmp_path / 'data'}", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: Image {str(tmp_path / 'data' / 'x' / 'empty.png')!r} cannot be read: "
                                     "the file is empty (0 bytes); expected an image file (fix or remove it, or "
                                     "pass --skip-bad-files).")
    result = run("pretrain", "--resize", "squash")
    assert result.exit_code == 2 and "'squash' is not one of 'stretch', 'crop', 'pad'" in result.output


# ---- file descriptors


def two_thousand_images(root):
    for c in range(2):
        (root / f"class{c}").mkdir()
    for i in range(2000):
        Image.fromarray(np.full((4, 4), i % 256, np.uint8)).save(root / f"class{i % 2}" / f"{i:04}.png")
    return root


def run_with_256_file_descriptors(code):
    limited = "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n" + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def test_2000_images_load_and_train_a_step_under_ulimit_256(tmp_path):
    import errno

    root = two_thousand_images(tmp_path)
    out = run_with_256_file_descriptors(f"""
        from pathlib import Path
        from PIL import Image
        paths = sorted(Path({str(root)!r}).glob("*/*.png"))
        try:
            opened = [Image.open(p) for p in paths]  # how images were read before: every file open at once
            print("all opened")
        except OSError as err:
            print("opening all at once fails:", err.errno)
        import keras
        from transferkit.data.sources import load_data, pipeline
        data = load_data("dir:{root}")
        print(data.x.shape, data.y.sum(), data.x[:, 0, 0, 0].sum())
        model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(), keras.layers.Dense(2)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(pipeline(data.x, data.y, batch_size=32), epochs=1, steps_per_epoch=1, verbose=0)
        print("steps", len(history.history["loss"]))
    """)
    assert out.stdout.splitlines() == [f"opening all at once fails: {errno.EMFILE}",
                                       f"(2000, 4, 4, 1) 1000 {float(sum(i % 256 for i in range(2000)))}",
                                       "steps 1"]
    assert "2000 images, 2 classes, 0 skipped" in out.stderr
