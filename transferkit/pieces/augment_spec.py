"""The `--augment` setting: a comma list of augmentation words, or a preset, checked without Keras.

Each word names one of Keras 3's random image preprocessing layers
(`transferkit.pieces.augmentation` builds them): `flip` (RandomFlip, horizontal),
`rotate:DEG` (RandomRotation, up to DEG degrees either way), `zoom:F`
(RandomZoom, in or out by up to F of the side), `translate:F`
(RandomTranslation, up to F of the side each way), `contrast:F`
(RandomContrast) and `randaugment` (RandAugment, 2 random operations). The
presets are data: `light` moves and turns (no flip, so it suits digits and
text, whose mirror image is another symbol), `medium` also flips and changes
contrast (photos). This module imports Keras only when it makes a word's layer
(`random_layer`), so the recipe checks the setting without it.

Example:

>>> parse_augment("light")
(('rotate', 10.0), ('zoom', 0.1), ('translate', 0.1))
>>> describe_augment(parse_augment("flip,rotate:15"))
'flip,rotate:15'
"""

from __future__ import annotations

from transferkit.errors import SettingsError

# preset -> its words
PRESETS: dict[str, str] = {
    "light": "rotate:10,zoom:0.1,translate:0.1",
    "medium": "flip,rotate:15,zoom:0.15,translate:0.1,contrast:0.2",
}
# word -> (what its value means, lowest allowed, highest allowed); None: the word takes no value
WORDS: dict[str, tuple[str, float, float] | None] = {
    "flip": None,
    "rotate": ("degrees", 0.0, 180.0),
    "zoom": ("a fraction of the side", 0.0, 1.0),
    "translate": ("a fraction of the side", 0.0, 1.0),
    "contrast": ("a contrast factor", 0.0, 1.0),
    "randaugment": None,
}
NO_STEPS = ("", "none")  # the specs of no augmentation (and `None`)
EXPECTED = ("none, light, medium, or a comma list of flip, rotate:DEG, zoom:F, translate:F, contrast:F, "
            "randaugment")

Augment = tuple[tuple[str, float | None], ...]


def parse_augment(spec: str | None) -> Augment:
    """The augmentation steps of `spec`, in order: `(word, value or None)` pairs; `()` for none.

    Args:
        spec: String. `"none"`, a preset (`"light"`, `"medium"`) or a comma list
            of words (presets may appear in it too). `None` is `"none"`.

    Returns:
        A tuple of `(word, value)` pairs; a word without a value has `None`.

    Raises:
        SettingsError: an unknown word, a missing or extra value, or a value out of range.
    """
    if spec is None or str(spec).strip().lower() in NO_STEPS:
        return ()
    steps: list[tuple[str, float | None]] = []
    for item in str(spec).replace(" ", "").lower().split(","):
        if item in PRESETS:
            steps.extend(parse_augment(PRESETS[item]))
            continue
        word, colon, value = item.partition(":")
        if word not in WORDS:
            raise SettingsError(f"augment must be {EXPECTED}; {item!r} is not one of them. "
                                f"Received: augment={spec!r}")
        meaning = WORDS[word]
        if meaning is None:
            if colon:
                raise SettingsError(f"augment word {word!r} takes no value. Received: augment={spec!r}")
            steps.append((word, None))
            continue
        what, low, high = meaning
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"augment word {word!r} needs a number ({what}) after '{word}:'. "
                                f"Received: augment={spec!r}") from None
        if not low < number <= high:
            raise SettingsError(f"augment {word}:F needs F in ({low:g}, {high:g}] ({what}). "
                                f"Received: augment={spec!r}")
        steps.append((word, number))
    return tuple(steps)


def describe_augment(steps: Augment) -> str:
    """The canonical spec of `steps` (`"none"` for no step): what the manifest records."""
    if not steps:
        return "none"
    return ",".join(word if value is None else f"{word}:{value:g}" for word, value in steps)


def random_layer(word: str, value: float | None, value_range: tuple[float, float], seed: int | None):
    """The Keras layer of one augmentation word: `flip`, `rotate`, `zoom`, `translate`, `contrast`, `randaugment`."""
    import keras

    layers = keras.layers
    if word == "flip":
        return layers.RandomFlip("horizontal", seed=seed)
    if word == "rotate":  # RandomRotation's factor is a fraction of a full turn, drawn in [-f, f]
        return layers.RandomRotation(value / 360.0, seed=seed)
    if word == "zoom":
        return layers.RandomZoom((-value, value), seed=seed)
    if word == "translate":
        return layers.RandomTranslation(value, value, seed=seed)
    if word == "contrast":
        return layers.RandomContrast(value, value_range=value_range, seed=seed)
    return layers.RandAugment(value_range=value_range, seed=seed)
