"""The images of a folder: one sub-folder per class, or images alone; hidden and non-image files counted.

Example:

>>> from transferkit.data.image_listing import list_images
>>> listing = list_images("photos")                     # doctest: +SKIP
>>> listing.class_names, len(listing.files)             # doctest: +SKIP
(('cat', 'dog'), 1500)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Listing:
    """The image files of a folder, in order, with their class numbers, and what was left out."""

    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    hidden: int = 0
    non_image: int = 0
    outside: int = 0  # images beside the class folders, in no class



def list_images(root: str | Path) -> Listing:
    """The images of `root`: one sub-folder per class (searched to any depth), or images alone.

    Names starting with `.` (`.DS_Store`, `._x.jpg`, `.git/`) and files without an
    image suffix are left out and counted. Files are sorted by path; classes by name.
    """
    root = Path(root)
    entries = sorted(root.iterdir())
    classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    hidden = sum(p.name.startswith(".") for p in entries)
    if not classes:
        files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
        images = [p for p in files if _has_image_suffix(p)]
        return Listing(tuple(images), None, None, hidden, len(files) - len(images))
    loose = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    outside = sum(_has_image_suffix(p) for p in loose)  # images beside the class folders, in no class
    files, labels, non_image = [], [], len(loose) - outside
    for label, folder in enumerate(classes):
        for path, is_hidden in _walk(folder):
            if is_hidden:
                hidden += 1
            elif _has_image_suffix(path):
                files.append(path)
                labels.append(label)
            else:
                non_image += 1
    return Listing(tuple(files), tuple(labels), tuple(p.name for p in classes), hidden, non_image, outside)


def _walk(folder: Path):
    """(path, hidden) for every file below `folder`, sorted; a hidden folder is one hidden entry, not entered."""
    found = []
    for top, dirs, names in os.walk(folder):
        found += [(Path(top, d), True) for d in dirs if d.startswith(".")]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(Path(top, n), n.startswith(".")) for n in names]
    return sorted(found)


def _has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


