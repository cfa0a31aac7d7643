"""`transferkit inspect`: the freeze audit of a classifier or of the artifact folder holding one.

The audit itself is a piece (`transferkit.pieces.freezing.audit`); this command
loads an artifact and picks the block rule of the base it was fine-tuned from.

Example:

>>> import transferkit as tk
>>> tk.inspect("saved_models/digits-classifier")               # doctest: +SKIP
block    trainable  batchnorm  trainable params  frozen params  lr x
block1   no         -          0                 8,320          -
...
"""

from __future__ import annotations

from pathlib import Path

import keras

from transferkit.pieces.freezing import BlockAudit, audit, find_base, format_audit, is_hub_model


def inspect(model: keras.Model | str | Path, verbose: bool = True) -> list[BlockAudit]:
    """Print and return the freeze audit of a classifier, or of the artifact folder holding one.

    Example:

    >>> rows = inspect("saved_models/digits-classifier", verbose=False)   # doctest: +SKIP
    >>> rows[-1].block
    'head'
    """
    blocks = None
    if not isinstance(model, keras.Model):
        from transferkit.store import artifacts

        manifest = artifacts.read_manifest(model, ("classifier",))
        model = artifacts.load_model(model)
        if manifest.base is not None and manifest.base.kind == "file":  # fine-tuned from --base FILE: its block rule
            from transferkit.pieces.backbones import base_blocks

            blocks = base_blocks(find_base(model))[1]
    if blocks is None and is_hub_model(find_base(model)):  # a keras-hub backbone: its pyramid levels
        from transferkit.finetuning.hub import hub_blocks

        blocks = hub_blocks(find_base(model))[1]
    rows = audit(model, blocks=blocks)
    if verbose:
        print(format_audit(rows), flush=True)
    return rows
