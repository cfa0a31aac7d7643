"""Image files to arrays: Pillow decodes (one file at a time), TensorFlow resizes as Keras does.

Every image is read with its true levels on the 8-bit scale (float32, 0..255):
8-bit grayscale and RGB as stored; 16-bit grayscale (`I;16`) times 255/65535;
1-bit as 0 or 255; palette images through their palette; CMYK as
`(255 - C) * (255 - K) / 255` per channel; JPEGs turned upright by their EXIF
orientation; the first frame of an animated GIF. Alpha is composited on white
(`c * a + 255 * (1 - a)`, with `a` in 0..1), the way a viewer shows the picture
on a page.

Channels: a folder is read as grayscale (1 channel) when every image is
(modes 1, L, LA, I, I;16, F), else as RGB (3 channels), grayscale images
repeated into R, G and B. A palette image counts as colour.

Sizes: `image_size` when given; else the common size when every image has it;
else the median height and the median width (the lower median, so each is a
size some image has); either at most 224 a side (`image_size`). `resize` says how an image of another size reaches that
size, as `keras.utils.image_dataset_from_directory` resizes it (bilinear,
without antialiasing, `tf.image.resize`): `stretch` it, center-`crop` it to the
aspect ratio first (`crop_to_aspect_ratio`), or `pad` it with zeros (black)
after fitting it inside (`pad_to_aspect_ratio`); see `fit_size_op`.

Listing a folder: `transferkit.data.image_listing`. `check_images` reads each
file's header and checks its data is whole without decoding its pixels, and
marks it plain or not: a plain file (8-bit RGB or gray JPEG or PNG, upright,
opaque) is decoded by TensorFlow ops to the same levels, in parallel and without
Python (`transferkit.data.image_ops`); the others are decoded by Pillow.

Example:

>>> from transferkit.data.images import read_images
>>> x = read_images(["cat.png", "dog.jpg"], image_size=32)   # doctest: +SKIP
>>> x.shape                                                   # doctest: +SKIP
(2, 32, 32, 3)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from transferkit.pieces.colors import LUMA
from transferkit.errors import SettingsError
from transferkit.data.image_size import fit_longest, median_size
from transferkit.data.progress import progress_bar
from transferkit.recipe import RESIZE_MODES

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
_THREADS = 4  # files opened at once by the check pass
# a plain file's format, told by its suffix: `check_images` marks a file plain only where they agree
PLAIN_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def plain_format(path: str | Path) -> str | None:
    """`"JPEG"` or `"PNG"` by the suffix of `path`, else `None`."""
    return PLAIN_FORMATS.get(Path(path).suffix.lower())


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Decoded images; `kept` indexes the files that were read, `bad` holds (path, reason) of the others."""

    x: np.ndarray
    kept: np.ndarray
    bad: tuple[tuple[str, str], ...]
    resized_to_median: bool
    scaled_from: tuple[int, int] | None = None  # the common or median size, where it was over LONGEST_SIDE


class BadImage(Exception):
    """A file that Pillow cannot open or decode; the message is the reason."""


def read_images(paths: list[str | Path], image_size: int | tuple[int, int] | None = None,
                channels: int | None = None, resize: str = "stretch") -> np.ndarray:
    """Images as `(N, H, W, C)` float32 in 0..255; a bad file raises `SettingsError` naming it.

    Args:
        paths: List of image file paths.
        image_size: Optional integer side or `(height, width)`. Defaults to the
            common size, or the median size when the images differ.
        channels: Optional integer, 1 or 3. Defaults to 1 when every image is grayscale, else 3.
        resize: String, `"stretch"`, `"crop"` or `"pad"`. Defaults to `"stretch"`.
    """
    return decode_images(paths, image_size, channels, resize).x


def decode_images(paths: list[str | Path] | tuple[Path, ...], image_size: int | tuple[int, int] | None = None,
                  channels: int | None = None, resize: str = "stretch", skip_bad_files: bool = False,
                  progress: bool = False) -> Decoded:
    """Read the headers of `paths` (sizes, modes), then decode one file at a time into one array.

    No file stays open between two images, so a folder of any length loads under
    a small `ulimit -n`. A file that cannot be read raises `SettingsError` naming
    it, or with `skip_bad_files` is left out and listed in `Decoded.bad`.
    """
    scan = _Scan(paths, image_size, channels, resize, skip_bad_files)
    x = np.empty((len(scan.headers),) + scan.size + (scan.channels,), dtype="float32")
    kept = []
    with progress_bar(len(scan.headers) if progress else 0) as tick:
        for i in scan.headers:
            try:
                image = decode_image(scan.paths[i], scan.channels)
            except BadImage as err:
                scan.refuse_or_skip(scan.paths[i], str(err))
            else:
                x[len(kept)] = fit_size(image, scan.size, resize)
                kept.append(i)
            tick()
    return scan.result(x[:len(kept)], kept)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What `check_images` found: the files that decode (`kept`), the others, and the size and channels chosen.

    `plain[j]` says whether file `kept[j]` is decoded by TensorFlow ops (`transferkit.data.image_ops`).
    """

    kept: np.ndarray
    bad: tuple[tuple[str, str], ...]
    size: tuple[int, int]
    channels: int
    resized_to_median: bool
    plain: np.ndarray
    scaled_from: tuple[int, int] | None = None  # as Decoded's


def check_images(paths: list[str | Path] | tuple[Path, ...], image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None, resize: str = "stretch", skip_bad_files: bool = False,
                 progress: bool = False) -> Checked:
    """What `decode_images` decides (size, channels, which files decode), holding no image: memory stays flat.

    One pass, in threads, opens each file once (`inspect_image`): its header,
    then a check that its data is whole which decodes no pixel where the format
    allows it (JPEG, PNG).
    """
    scan = _Scan(paths, image_size, channels, resize, skip_bad_files, inspect=inspect_image,
                 progress="checking images" if progress else None)
    kept = list(scan.headers)
    plain = [scan.headers[i][3] == "L" or scan.headers[i][3] == "RGB" and scan.channels == 3 for i in kept]
    done = scan.result(np.empty((len(kept), 0)), kept)
    return Checked(kept=done.kept, bad=done.bad, size=scan.size, channels=scan.channels,
                   resized_to_median=done.resized_to_median, plain=np.asarray(plain, dtype=bool),
                   scaled_from=done.scaled_from)


def inspect_image(path: Path) -> tuple[int, int, bool, str | None]:
    """`read_header`'s answer and the plain kind of `path`, once its data is known whole; else `BadImage`.

    The kind is `"RGB"` or `"L"` for a plain file (8-bit RGB or gray JPEG or
    PNG, stored upright, with no transparency, named by its format's suffix:
    `transferkit.data.image_ops.plain_format`), else `None`. Whole means: a
    JPEG's end-of-image marker follows its first scan (`_jpeg_is_whole`); a PNG
    holds every chunk through IEND, each with its CRC right (Pillow's
    `verify()`). Neither decodes a pixel. A JPEG without the marker, and a file
    in any other format, is decoded by Pillow (a JPEG at an eighth of its size,
    which still reads all its data), and Pillow's verdict stands; such a JPEG
    is not plain (`tf.io` refuses it even where Pillow reads it whole).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            header = _header(im)
            args = im.tile[0].args if len(im.tile) == 1 else None
            rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
            plain = (im.format in ("JPEG", "PNG") and plain_format(path) == im.format and im.mode in ("RGB", "L")
                     and rawmode == im.mode and "transparency" not in im.info and _orientation(im) == 1)
            if im.format == "PNG" and len(im.tile) == 1:
                im.fp.seek(im.tile[0].offset)
                plain = plain and b"eXIf" not in im.fp.read()  # EXIF after the pixels: Pillow may turn the image
                im.verify()
            else:
                if im.format == "JPEG":
                    im.fp.seek(0)
                    if _jpeg_is_whole(im.fp.read()):
                        return (*header, im.mode if plain else None)
                    plain = False  # tf.io refuses a JPEG without its end marker; Pillow may still read it all
                    im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
        raise BadImage(_reason(path, err)) from None
    return (*header, im.mode if plain else None)


def _jpeg_is_whole(data: bytes) -> bool:
    """Whether an end-of-image marker (0xFFD9) follows the header of the JPEG's first scan.

    The segments before the scan are walked by their lengths (an EXIF thumbnail
    has its own marker, inside one). Inside entropy-coded data every 0xFF byte
    is followed by 0x00 or a restart number, so the first 0xFFD9 after the scan
    header ends the image (after further scans, for a progressive JPEG); a file
    cut short has none.
    """
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", at + 2 + length) >= 0
        else:
            at += 2 + length
    return False


class _Scan:
    """The headers of a file list, the size and channels they call for, and the bad files found so far.

    `inspect` (`read_header`, or `inspect_image`) reads the files in threads; their answers are taken in order,
    so the first bad file is the one refused.
    """

    def __init__(self, paths, image_size, channels, resize: str, skip_bad_files: bool, inspect=None,
                 progress: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        if resize not in RESIZE_MODES:
            raise SettingsError(f"resize must be one of {', '.join(RESIZE_MODES)}. Received: resize={resize!r}")
        self.paths = [Path(p) for p in paths]
        self.skip_bad_files = skip_bad_files
        self.image_size = image_size
        self.bad: list[tuple[str, str]] = []
        self.headers = {}

        def read(path):
            try:
                return (inspect or read_header)(path), None
            except BadImage as err:
                return None, str(err)

        with (progress_bar(len(self.paths) if progress else 0, progress or "") as tick,
              ThreadPoolExecutor(_THREADS) as pool):
            for i, (path, (header, reason)) in enumerate(zip(self.paths, pool.map(read, self.paths))):
                if reason is None:
                    self.headers[i] = header
                else:
                    self.refuse_or_skip(path, reason)
                tick()
        self.sizes = [header[:2] for header in self.headers.values()]
        self.median = median_size(self.sizes) if self.sizes else None
        if image_size is not None:
            self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        elif self.sizes:
            self.size = fit_longest(self.median)
        else:
            self.size = (1, 1)
        if channels is None:
            channels = 1 if all(header[2] for header in self.headers.values()) else 3
        self.channels = channels

    def refuse_or_skip(self, path: Path, reason: str) -> None:
        if not self.skip_bad_files:
            raise SettingsError(f"Image {str(path)!r} cannot be read: {reason}; expected an image file "
                                "(fix or remove it, or pass --skip-bad-files).")
        self.bad.append((str(path), reason))

    def result(self, x: np.ndarray, kept: list[int]) -> Decoded:
        order = {str(p): j for j, p in enumerate(self.paths)}
        self.bad.sort(key=lambda b: order[b[0]])
        return Decoded(x=x, kept=np.asarray(kept, dtype="int64"), bad=tuple(self.bad),
                       resized_to_median=self.image_size is None and len(set(self.sizes)) > 1,
                       scaled_from=self.median if self.image_size is None and self.median != self.size else None)


def read_header(path: Path) -> tuple[int, int, bool]:
    """Height and width as shown (after the EXIF orientation) and whether the image is grayscale."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _header(im)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
        raise BadImage(_reason(path, err)) from None


def _header(im) -> tuple[int, int, bool]:
    width, height = im.size
    gray = im.mode in GRAY_MODES
    return (width, height, gray) if _orientation(im) in _SWAPS_SIDES else (height, width, gray)


def _orientation(im) -> int:
    """The EXIF orientation an opened image shows in its header (1: upright)."""
    # PNG reads EXIF only by decoding (unless the chunk comes first); JPEG, TIFF and WebP have it in the header
    return im.getexif().get(0x0112, 1) if "exif" in im.info or im.format == "TIFF" else 1


def decode_image(path: Path | bytes, channels: int) -> np.ndarray:
    """One image file (or its encoded bytes) as `(H, W, channels)` levels on the 8-bit scale (uint8, or float32)."""
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            im.load()  # decode now, inside the `with`: the file is closed when it ends
            image = ImageOps.exif_transpose(im)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files
        raise BadImage(f"{type(err).__name__}: {err}" if isinstance(path, bytes) else _reason(path, err)) from None
    return to_channels(levels(image), channels)


def _reason(path: Path, err: Exception) -> str:
    from PIL import UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError as os_err:
        return f"{type(os_err).__name__}: {os_err.strerror}"
    if isinstance(err, UnidentifiedImageError):
        return f"its content is not an image Pillow can read, despite the suffix {path.suffix!r}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def levels(image) -> np.ndarray:
    """A loaded PIL image as `(H, W, 1 or 3)` levels on the 8-bit scale; see the module docstring."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "RGBa", "La"):
        image = image.convert("LA" if mode == "La" else "RGBA")
    mode = image.mode
    if mode in ("RGBA", "LA"):
        values = np.asarray(image, dtype="float32")
        alpha = values[..., -1:] / 255
        return values[..., :-1] * alpha + 255 * (1 - alpha)
    if mode.startswith("I"):
        return np.asarray(image, dtype="float32")[..., None] * np.float32(255 / 65535)
    if mode == "F":
        return np.asarray(image, dtype="float32")[..., None]
    if mode == "CMYK":
        cmyk = np.asarray(image, dtype="float32")
        return (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def to_channels(values: np.ndarray, channels: int) -> np.ndarray:
    """Gray repeated into RGB, or RGB to gray by ITU-R BT.601 luma (`LUMA`; Pillow's `convert("L")`)."""
    if values.shape[-1] == channels:
        return values
    if channels == 3:
        return np.repeat(values, 3, axis=-1)
    if values.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(values).convert("L"))[..., None]
    return (values @ np.array(LUMA, dtype="float32"))[..., None]


def fit_size(values: np.ndarray, size: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """`(H, W, C)` levels brought to `size` (height, width) as float32: `fit_size_op`, run eagerly."""
    return fit_size_op(values, size, resize).numpy()


def fit_size_op(image, size: tuple[int, int], resize: str):
    """`image` (a `(H, W, C)` tensor or array of levels) as float32 at `size`, resized as Keras's pipeline does.

    `keras.utils.image_dataset_from_directory`'s ways, bilinear without antialiasing: `stretch` is
    `tf.image.resize`; `crop` cuts the centered box of the target's aspect ratio first (`smart_resize`'s box, in
    its float32 arithmetic); `pad` is `tf.image.resize_with_pad` (fitted inside, then black margins, the larger
    one after an odd difference). An image already at `size` comes back unchanged (each output pixel lands on an
    input pixel), so no `tf.cond`, which would cost more than the resize, guards it.
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    height, width = size
    if resize == "pad":
        out = tf.image.resize_with_pad(image, height, width, method="bilinear")
    else:
        out = tf.image.resize(_center_box(image, size) if resize == "crop" else image, size, method="bilinear")
    return tf.ensure_shape(out, (height, width, image.shape[-1]))


def _center_box(image, size: tuple[int, int]):
    """The centered part of `image` with the aspect ratio of `size`, as Keras's `smart_resize` cuts it."""
    import tensorflow as tf

    target_h, target_w = size
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    box_h = tf.cast(tf.cast(width * target_h, tf.float32) / target_w, tf.int32)
    box_w = tf.cast(tf.cast(height * target_w, tf.float32) / target_h, tf.int32)
    box_h, box_w = tf.maximum(tf.minimum(height, box_h), 1), tf.maximum(tf.minimum(width, box_w), 1)
    top = tf.cast(tf.cast(height - box_h, tf.float32) / 2, tf.int32)
    left = tf.cast(tf.cast(width - box_w, tf.float32) / 2, tf.int32)
    return image[top:top + box_h, left:left + box_w]
