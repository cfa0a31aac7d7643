"""The two kinds of failure transferkit reports to users.

`SettingsError` means the user asked for something that cannot work (a bad
flag, a missing path, a value out of range): the CLI exits with status 2.
`TransferkitError` means the request was valid but the work failed (weights
that could not be downloaded, an export that does not match its model): the
CLI exits with status 1. Both carry one line that names the value and what was
expected.
"""

from __future__ import annotations


class TransferkitError(RuntimeError):
    """A valid request that failed while running. CLI exit status 1."""


class SettingsError(ValueError):
    """A setting, path or input that cannot work. CLI exit status 2."""
