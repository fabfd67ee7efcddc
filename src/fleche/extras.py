"""The optional extras (``pip install 'fleche[NAME]'``) and the one error for a missing one.

Every import of an optional dependency goes through :class:`needs_extra`, so a base install
says in one line what to install, whichever feature was reached for::

    with needs_extra("sql", "fleche.storage.Sql"):
        import sqlalchemy

Only a missing top-level package of the extra becomes a :class:`MissingExtraError`; any other
``ModuleNotFoundError`` (a bug, a submodule an old version lacks) propagates unchanged.
"""

from __future__ import annotations

from types import TracebackType

from .errors import FlecheError

__all__ = ["EXTRAS", "MissingExtraError", "needs_extra"]

EXTRAS: dict[str, frozenset[str]] = {
    "sql": frozenset({"sqlalchemy", "psycopg", "psycopg_binary", "pymysql"}),
    "h5": frozenset({"bagofholding", "h5py", "numpy"}),
    "dask": frozenset({"dask", "distributed", "pandas", "pyarrow", "numpy"}),
    "ray": frozenset({"ray"}),
    "pandas": frozenset({"pandas", "numpy"}),
}
"""Each extra of ``pyproject.toml`` and the top-level modules it brings."""


class MissingExtraError(FlecheError, ModuleNotFoundError):
    """A feature needs an extra that is not installed; the message, one line, says which and
    what to run. ``name`` is the missing module, as for any ``ModuleNotFoundError``."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the {extra!r} extra, and {module} is not installed: "
            f"pip install 'fleche[{extra}]'",
            name=module,
        )
        self.feature = feature
        self.extra = extra


class needs_extra:  # noqa: N801 - used as a statement: `with needs_extra("sql", ...):`
    """Imports in this block belong to the extra ``extra``, for ``feature`` (what the user
    reached for, as they would name it): a missing module of that extra raises
    :class:`MissingExtraError` in its place (chained to nothing, so the traceback stays short).
    """

    def __init__(self, extra: str, feature: str) -> None:
        if extra not in EXTRAS:
            raise ValueError(f"no extra {extra!r}; extras are {', '.join(EXTRAS)}")
        self.extra = extra
        self.feature = feature

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not isinstance(error, ModuleNotFoundError) or isinstance(error, MissingExtraError):
            return
        module = error.name or ""
        if module in EXTRAS[self.extra]:  # the package itself, not a submodule of one installed
            raise MissingExtraError(self.feature, self.extra, module) from None
