"""Deprecated public names: one warning text, so every renamed name says the same three things
(what is deprecated, what to use instead, when it goes)."""
from __future__ import annotations

import warnings

#: the release that removes the names deprecated in this one (kept for one release)
REMOVED_IN = "0.4"


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``, at the user's line (the default
    ``stacklevel`` points at the caller of the function that calls this). Python's default
    filters show a ``DeprecationWarning`` once per calling line."""
    warnings.warn(f"{old} is deprecated and will be removed in horovod_iter {REMOVED_IN}: "
                  f"use {new}", DeprecationWarning, stacklevel=stacklevel)
