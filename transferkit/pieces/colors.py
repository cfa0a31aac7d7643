"""Color conventions shared by image decoding and the models: one rule for gray and RGB.

`LUMA` are the ITU-R BT.601 luma weights of R, G and B (Rec. 601), what
Pillow's `convert("L")` and `tf.image.rgb_to_grayscale` use: RGB images become
gray by them, gray images become RGB by repeating the one channel.

Example:

>>> round(sum(LUMA), 6)
1.0
"""

LUMA = (0.299, 0.587, 0.114)
