"""Decorated functions without a cache of their own, for the tests of ``fleche.bind`` in spawn
process pools (importable, so they pickle by reference)."""

from __future__ import annotations

import os

import fleche
from fleche import fleche as cached


@cached
def inner(x):
    return x + 1


@cached
def outer(x):
    """Calls another decorated function: both go to the bound cache."""
    return inner(x) * 10


def where(_=None):
    """The process and the cache a decorated call here would use."""
    return os.getpid(), fleche.cache()


@fleche.bind("memory://option-tasks")
@cached
def bound_here(x):
    """Bound where it is defined: pickles by reference, as the function it replaces would."""
    return -x
