"""The size a folder's images are read at when no size is asked for: their common or median size, at most 224 a side.

Images of one size keep it, and images of mixed sizes take the lower median
height and the lower median width (each a size some image has), as
`common_size` computes; then, where its longer side is over `LONGEST_SIDE`
(224, the input size of ImageNet models in Keras Applications and timm), the
size is scaled down to it, the aspect ratio kept (`fit_longest`): a folder of
phone photos (4032x3024) is read at 224x168, not at a size no encoder fits.

Example:

>>> common_size([(3024, 4032), (3000, 4000), (480, 640)])
(168, 224)
>>> common_size([(9, 30), (12, 10), (20, 6)])
(12, 10)
"""

from __future__ import annotations

LONGEST_SIDE = 224


def median_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size all `(height, width)` sizes share, else the lower median height and the lower median width."""
    heights, widths = sorted(h for h, _ in sizes), sorted(w for _, w in sizes)
    middle = (len(sizes) - 1) // 2
    return heights[middle], widths[middle]


def fit_longest(size: tuple[int, int], longest: int = LONGEST_SIDE) -> tuple[int, int]:
    """`(height, width)` scaled down so its longer side is `longest`, each side rounded (at least 1); else as is."""
    height, width = size
    if max(height, width) <= longest:
        return height, width
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def common_size(sizes: list[tuple[int, int]], longest: int = LONGEST_SIDE) -> tuple[int, int]:
    """The size images of `sizes` are read at by default: `median_size`, its longer side at most `longest`."""
    return fit_longest(median_size(sizes), longest)
