"""A cheap bound on how large a value pickles to, for deciding what to keep inline.

Both the cache (values kept in the call record) and destructuring (parts kept inside their
container's entry) ask it on every save, so it never pickles: it walks plain values only and
stops as soon as the budget is spent.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["small_pickle_size"]


def small_pickle_size(value: Any, budget: int) -> int | None:
    """Roughly how many bytes ``value`` pickles to, if it is a plain value under ``budget``.

    Plain values are ``None``, bools, numbers, str and bytes, numpy arrays and scalars without
    object dtype, and tuples, lists, sets and dicts of plain values; anything else (a dataclass,
    a data frame, an object of the user's) gives ``None``, as does a value over the budget.
    """
    t = type(value)
    if value is None or t is bool or t is float or t is complex:
        return 9
    if t is int:
        return value.bit_length() // 8 + 9 if value.bit_length() < 8 * budget else None
    if t is str or t is bytes:
        return len(value) + 9 if len(value) < budget else None
    if t in (tuple, list, set, frozenset):
        total = 4
        for item in value:
            size = small_pickle_size(item, budget - total)
            if size is None:
                return None
            total += size
        return total if total < budget else None
    if t is dict:
        total = 4
        for k, item in value.items():
            ks = small_pickle_size(k, budget - total)
            vs = None if ks is None else small_pickle_size(item, budget - total - ks)
            if vs is None:
                return None
            total += ks + vs
        return total if total < budget else None
    # numpy arrays and scalars only: pandas objects have nbytes too, but not always numpy dtypes
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return None if value.dtype.hasobject or value.nbytes >= budget else value.nbytes + 128
    return None
