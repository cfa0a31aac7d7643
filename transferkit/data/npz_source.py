"""`npz:PATH`: arrays `x` and optional `y`, memory-mapped where the file allows, labels checked.

An uncompressed member (`np.savez`) is a plain `.npy` inside the zip and is
mapped at its offset, so reading the inputs never copies the file into memory;
a compressed one (`np.savez_compressed`) is read. Labels are whole class numbers
or strings (class names, sorted).

Example:

>>> from transferkit.data.npz_source import load_npz
>>> x, y, class_names = load_npz("data.npz")   # doctest: +SKIP
"""

from __future__ import annotations

import struct
import zipfile

import numpy as np

from transferkit.errors import SettingsError


def load_npz(arg: str) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """Inputs `x` (memory-mapped where the file allows), labels and class names from the .npz file `arg`."""
    try:
        arrays = np.load(arg)
    except (OSError, ValueError) as err:
        raise SettingsError(f"Data file {arg!r} is not a readable .npz file: {err}.") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise SettingsError(f"Data file {arg!r} holds one array; expected an .npz file with 'x' and optional 'y'.")
    with arrays:
        if "x" not in arrays:
            raise SettingsError(f"Data file {arg!r} has arrays {sorted(arrays.files)}; expected one named 'x'.")
        x = np.asarray(_npz_member(arg, arrays, "x"), dtype="float32")
        raw_y = _npz_member(arg, arrays, "y") if "y" in arrays else None
    if x.ndim not in (2, 3, 4):
        raise SettingsError(f"Array 'x' in {arg!r} has shape {x.shape}; expected (N, D), (N, H, W) or (N, H, W, C).")
    if x.ndim == 3:
        x = x[..., None]
    y, class_names = None, None
    if raw_y is not None:
        y, class_names = _npz_labels(arg, np.asarray(raw_y).reshape(-1))
        if len(y) != len(x):
            raise SettingsError(f"Arrays in {arg!r} disagree: {len(x)} inputs but {len(y)} labels.")
    return x, y, class_names


def _npz_member(path: str, arrays, name: str) -> np.ndarray:
    """Array `name` of an .npz: memory-mapped from the file when stored uncompressed (`np.savez`), else read.

    `np.load(mmap_mode="r")` maps `.npy` files only; an .npz member is read into
    memory. A member stored without compression is a plain `.npy` inside the zip,
    so it can be mapped at its offset.
    """
    try:
        mapped = _map_stored_member(path, name + ".npy")
        return arrays[name] if mapped is None else mapped
    except ValueError as err:  # object arrays need pickle, which we do not load
        raise SettingsError(f"Array {name!r} in {path!r} cannot be read: {err}; expected numbers "
                            "(or strings for 'y').") from None


def _map_stored_member(path: str, member: str) -> np.ndarray | None:
    with zipfile.ZipFile(path) as zf:
        if member not in zf.namelist():
            return None
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field come before the data
        if local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _npz_labels(path: str, raw: np.ndarray) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Class numbers from labels: strings become the sorted class names; numbers must be whole."""
    if raw.dtype.kind in "US":
        names, y = np.unique(raw, return_inverse=True)
        return y.astype("int64").reshape(-1), tuple(str(n) for n in names)
    if raw.dtype.kind not in "biuf":
        raise SettingsError(f"Array 'y' in {path!r} has dtype {raw.dtype}; expected whole numbers (class numbers "
                            "0, 1, 2, ...) or strings (class names).")
    whole = np.isfinite(raw) & (raw == np.round(raw)) if raw.dtype.kind == "f" else np.ones(len(raw), bool)
    if not whole.all():
        i = int(np.argmin(whole))
        raise SettingsError(f"Array 'y' in {path!r} has label {raw[i].item()!r} at index {i}; expected whole "
                            "numbers (class numbers 0, 1, 2, ...) or strings (class names).")
    return raw.astype("int64"), None
