"""Content keys for the nodes of a Dask graph.

A task's key is the lookup key of a :class:`~fleche.call.Call`: the function's identity (its
digest) and the digests of its arguments, where a reference to another task stands for that
task's own key (:class:`~fleche._tasks.Upstream`) and a reference to data in the graph for the
data's digest. Keys therefore depend on what a graph computes, never on its random or tokenized
key names, and a graph built again in another process gets the same keys.

- Data embedded in the graph (``da.from_array(numpy_array)``, ``dd.from_pandas(frame)``) is
  digested by content, each object once per graph however many tasks use it.
- A fused task (``dask._task_spec.Task.fuse``) gets the key of its subgraph's output task, as if
  it had not been fused, so fused and unfused graphs share their stored results.
- Values :func:`fleche.digest.digest` has no rule for (``toolz`` compositions, ``methodcaller``,
  numpy functions, reader objects) are keyed by dask's deterministic token
  (``dask.base.tokenize(..., ensure_deterministic=True)``), which may change between dask
  versions (then results are computed again, never mixed up).
- A task with a value that has neither has no key: it runs uncached, and so does everything
  downstream of it.
- Functions are identified as :func:`fleche.digest.digest` identifies them (a module-level
  function by its module and name); with ``hash_code=True`` the code of every Python function
  in a task, its own or one passed to it (``bag.map(f)``, ``map_partitions(f)``), is part of the
  key too, so editing a function recomputes what it computed.
- ``source_state(task)``, if given, is called for every source task (one that depends on no
  other task: the readers of ``dd.read_parquet``, ``dd.read_csv``...). What it returns, unless
  ``None``, becomes part of the task's key and so of every key downstream: a version, or the
  state of the files read (:func:`file_state`).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dask._task_spec as ts
from dask.tokenize import tokenize
from dask.utils import funcname

from ._tasks import ComputeAndSave, Upstream, Whole, load_result
from .call import Call
from .digest import Digest, Indigestible, code_digest, digest

__all__ = ["GraphKeys", "InlineTask", "Keying", "SliceValue", "file_state"]

Key = Hashable
SourceState = Callable[[ts.Task], Any]

TASK_VERSION = "fleche.dask.task"
"""The ``version`` of every task's call record: tells task records from ``@fleche`` ones."""

_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})


@dataclass(frozen=True)
class Keying:
    """How tasks are keyed beyond their functions and arguments (see the module docstring)."""

    source_state: SourceState | None = None
    hash_code: bool = False

    def __post_init__(self) -> None:
        if self.source_state is not None and not callable(self.source_state):
            raise TypeError(
                f"source_state must be a callable (task) -> value, got {self.source_state!r}"
            )


@dataclass(frozen=True)
class InlineTask:
    """A task nested in another task's arguments, kept as its function and arguments."""

    func: Any
    args: tuple
    kwargs: dict

    def __digest__(self) -> tuple:
        return (self.func, self.args, self.kwargs)


@dataclass(frozen=True)
class SliceValue:
    """A ``slice`` in a task's arguments (array indexing, rechunk splits), by its three bounds."""

    start: Any
    stop: Any
    step: Any


class _Uncacheable(Exception):
    """A node has no content key (a value without a digest, a dependency outside the graph)."""


class GraphKeys:
    """The content key of every node of one graph, computed once, in dependency order.

    ``standins[key]`` is what a reference to ``key`` stands for in downstream keys
    (:class:`Upstream` for a task, the digest of the data for a data node, ``None`` where the
    node has no key); ``calls[key]`` is the call record of each task that has one. ``known``
    gives stand-ins of keys outside ``graph`` (the inputs of a fused subgraph); ``memo`` maps
    ``id(value)`` to its digest and may be shared between the graphs of one computation.
    """

    def __init__(
        self,
        graph: Mapping[Key, ts.GraphNode],
        keying: Keying = Keying(),
        *,
        known: Mapping[Key, Any] | None = None,
        memo: dict[int, tuple[Digest, Any]] | None = None,
    ) -> None:
        self.graph = graph
        self.keying = keying
        self.standins: dict[Key, Any] = dict(known or {})
        self.calls: dict[Key, Call] = {}
        self._memo = memo if memo is not None else {}
        for key in _topological(graph):
            self._key_node(key, graph[key])

    def lookup_keys(self) -> dict[Key, Digest]:
        """The store key of every task that has a call record."""
        return {key: self.standins[key].key for key in self.calls}

    # -- nodes ----------------------------------------------------------------------------------

    def _key_node(self, key: Key, node: ts.GraphNode) -> None:
        try:
            if isinstance(node, ts.Alias):
                standin = self._ref(node.target)
            elif isinstance(node, ts.DataNode):
                standin = self._value(node.value)
            elif isinstance(node, ts.Task):
                if node.func is load_result:  # already rewritten: a load of a stored result
                    standin = Upstream(node.args[1])
                else:
                    call = self._call(node)
                    standin = Upstream(call.to_lookup_key())
                    self.calls[key] = call
            else:
                standin = None
        except (_Uncacheable, Indigestible):
            standin = None
        self.standins[key] = standin

    def _call(self, node: ts.Task) -> Call:
        func = node.func
        if isinstance(func, ComputeAndSave):  # already rewritten: keep its key
            return func.call
        if func is ts._execute_subgraph:
            return self._fused_call(node)
        arguments: dict[str, Any] = {
            "args": _stored(tuple(self._structure(a) for a in node.args)),
            "kwargs": _stored({k: self._structure(v) for k, v in node.kwargs.items()}),
        }
        source_state = self.keying.source_state
        if source_state is not None and self._is_source(node):
            state = source_state(node)
            if state is not None:
                arguments["source"] = self._structure(state)
        return Call(
            name=funcname(func),
            arguments=arguments,
            version=TASK_VERSION,
            code_digest=str(self._value(func)),  # a plain str: what every call storage takes
        )

    def _fused_call(self, node: ts.Task) -> Call:
        """The call of a fused subgraph's output task, keyed as if nothing had been fused."""
        inner, outkey, inkeys, *refs = node.args
        known = {inkey: self._structure(ref) for inkey, ref in zip(inkeys, refs)}
        keys = GraphKeys(inner, self.keying, known=known, memo=self._memo)
        call = keys.calls.get(outkey)
        if call is None:
            raise _Uncacheable(outkey)
        return call

    def _is_source(self, node: ts.Task) -> bool:
        return not any(type(self.standins.get(dep)) is Upstream for dep in node.dependencies)

    # -- arguments ------------------------------------------------------------------------------

    def _ref(self, key: Key) -> Any:
        standin = self.standins.get(key)
        if standin is None:
            raise _Uncacheable(key)
        return standin

    def _structure(self, obj: Any) -> Any:
        """A task argument as a digestible value: references replaced by stand-ins, large or
        foreign values by their digests."""
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is tuple or t is list or t is set or t is frozenset:
            return t(self._structure(a) for a in obj)
        if t is dict:
            return {k: self._structure(v) for k, v in obj.items()}
        if t is slice:
            return SliceValue(*(self._structure(v) for v in (obj.start, obj.stop, obj.step)))
        if isinstance(obj, ts.TaskRef):
            return self._ref(obj.key)
        if isinstance(obj, ts.Alias):
            return self._ref(obj.target)
        if isinstance(obj, ts.DataNode):
            return self._value(obj.value)
        if isinstance(obj, ts.NestedContainer):
            items = [self._structure(a) for a in obj.args]
            if isinstance(obj, ts.Dict):
                return dict(zip(items[::2], items[1::2]))
            return obj.klass(items)
        if isinstance(obj, ts.Task):
            return InlineTask(
                self._value(obj.func),
                tuple(self._structure(a) for a in obj.args),
                {k: self._structure(v) for k, v in obj.kwargs.items()},
            )
        return self._value(obj)

    def _value(self, obj: Any) -> Digest:
        """The digest of one value, computed once per graph (the memo keeps ``obj`` alive, so its
        ``id`` cannot be reused by another object meanwhile)."""
        known = self._memo.get(id(obj))
        if known is not None:
            return known[0]
        try:
            d = digest(obj)
        except Indigestible:
            d = _token_digest(obj)
        if self.keying.hash_code:
            d = _with_code(d, obj)
        self._memo[id(obj)] = (d, obj)
        return d


def _with_code(d: Digest, obj: Any) -> Digest:
    """``d`` combined with the code digest of the Python function ``obj`` is or wraps."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if not isinstance(obj, (types.FunctionType, types.MethodType)):
        return d
    try:
        return digest(("fleche.dask.code", d, code_digest(obj)))
    except Indigestible:
        return d


def _stored(arguments: Any) -> Any:
    """Task arguments as the record keeps them: a few plain values as they are (inline in the
    record), anything else as one :class:`Whole` value. Value storages would otherwise store
    each element apart and take the digest inside an :class:`Upstream` for a reference."""
    budget, pending = 16, [arguments]
    while pending:
        obj = pending.pop()
        t = type(obj)
        if t in (list, tuple, set, frozenset):
            budget -= len(obj)
            pending.extend(obj)
        elif t is dict:
            budget -= len(obj)
            pending.extend(obj.keys())
            pending.extend(obj.values())
        elif t not in _PLAIN:
            return Whole(arguments)
        if budget < 0:
            return Whole(arguments)
    return arguments


def _token_digest(obj: Any) -> Digest:
    try:
        token = tokenize(obj, ensure_deterministic=True)
    except Exception as e:  # any failure of a foreign object's tokenization: no key
        raise _Uncacheable(type(obj)) from e
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return digest(("fleche.dask.token", kind, token))


def _topological(graph: Mapping[Key, ts.GraphNode]) -> list[Key]:
    """The keys of ``graph``, each after its dependencies (dependencies outside are skipped)."""
    order: list[Key] = []
    state: dict[Key, int] = {}
    for root in graph:
        if root in state:
            continue
        stack = [(root, False)]
        while stack:
            key, done = stack.pop()
            if done:
                state[key] = 2
                order.append(key)
                continue
            if key in state or key not in graph:
                continue
            state[key] = 1
            stack.append((key, True))
            stack.extend((dep, False) for dep in graph[key].dependencies if dep not in state)
    return order


def file_state(task: ts.Task) -> tuple | None:
    """Size and modification time of every local file a source task names, for its key.

    Use as ``source_state=file_state``: absolute paths (``str`` or ``os.PathLike``) anywhere in
    the task's arguments count, and a directory counts as every file beneath it. Rewriting or
    touching an input file then gives new keys to everything computed from it. Returns ``None``
    (the key stays as it is) for a task that names no existing file.
    """
    found = sorted({state for path in _paths(task.args, task.kwargs) for state in _states(path)})
    return tuple(found) if found else None


def _paths(*objs: Any) -> Iterator[str]:
    for obj in objs:
        if isinstance(obj, (str, os.PathLike)):
            path = os.fsdecode(obj)
            if os.path.isabs(path) and os.path.exists(path):
                yield path
        elif isinstance(obj, dict):
            yield from _paths(*obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            yield from _paths(*obj)
        elif isinstance(obj, ts.DataNode):
            yield from _paths(obj.value)
        elif isinstance(obj, ts.Task):
            yield from _paths(obj.args, obj.kwargs)


def _states(path: str) -> Iterator[tuple[str, int, int]]:
    if os.path.isdir(path):
        for directory, _, names in os.walk(path):
            for name in names:
                yield from _states(os.path.join(directory, name))
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    yield (path, st.st_size, st.st_mtime_ns)
