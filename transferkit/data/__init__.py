"""Data specs to sources (digits, npz, image folders, tfds), splits, and image decoding."""
