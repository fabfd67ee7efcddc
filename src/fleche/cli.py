"""The ``fleche`` command line (also ``python -m fleche``): look inside a store and tend it.

Every command takes a store spec (see :mod:`fleche.spec`)::

    fleche info [SPEC]                    where it is, counts, size, functions (no SPEC: the
                                          default store, FLECHE_CACHE's or the user cache's)
    fleche ls SPEC [--name NAME] [--where ARG=VALUE ...] [--limit N]
    fleche show SPEC KEY                  one call in full (short keys work)
    fleche evict SPEC KEY...              remove calls (their values stay until gc)
    fleche evict SPEC [--name NAME] [--older-than 7d] [--dry-run]
                                          remove the calls of a function, or older ones
    fleche clear SPEC [--yes] [--dry-run] remove every call and value (asks first)
    fleche gc SPEC [--dry-run]            remove values no call needs
    fleche verify SPEC [--repair]         load everything, report (and evict) unusable entries
    fleche copy SRC DST                   copy every call and value DST lacks

A SPEC may name an object store (``s3://bucket/prefix``, ``fsspec+memory://NAME``) or a SQL
store whose values are objects (``postgresql://host/db?values=s3://bucket/prefix``); sizes are
then those of the objects.

``--json`` gives machine output. Exit status: 0 on success; 1 when ``verify`` finds problems
(``verify --repair``: problems it could not repair), a key is not stored, or the store fails
(a database that cannot be reached, a corrupt entry stopping ``copy``); 2 for usage errors (bad
options, a bad spec, a store that does not exist, a malformed or ambiguous key).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import re
import reprlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._terminal import Progress, count, duration, size, table, terminal_width
from .call import DigestedCall, QueryCall
from .caches import Cache
from .digest import Digest
from .errors import AmbiguousDigestError, CorruptEntryError, FlecheError, SpecError
from .query import start_time
from .spec import CACHE_ENV, StoreSpec, default_spec, mask, parse
from .storage.base import start_text
from .verify import repair, verify

__all__ = ["main"]


class UsageError(Exception):
    """The command line asks for something impossible: exit status 2."""


class Failure(Exception):
    """The command ran and failed (a key not stored, a store error): exit status 1."""


# -- opening stores --------------------------------------------------------------------------------


def _open(text: str, must_exist: bool = True) -> tuple[StoreSpec, Cache]:
    # Opened before the existence check, so a store needing an extra says so first.
    try:
        spec = parse(text)
        cache = spec.open()
    except SpecError as e:
        raise UsageError(str(e)) from None
    if must_exist and not spec.exists():
        where = spec.sqlite_path() or mask(spec.calls)
        raise UsageError(f"no store at {where}: it does not exist (check the spec {mask(text)!r})")
    return spec, cache


def _default_store() -> tuple[str, str]:
    """The spec of the store a decorated function without a cache uses in a process started
    like this one, and where that choice comes from (``FLECHE_CACHE`` or ``default``)."""
    named = os.environ.get(CACHE_ENV)
    return (named, CACHE_ENV) if named else (default_spec(), "default")


_SOURCES = {
    CACHE_ENV: f"the environment variable {CACHE_ENV}",
    "default": f"the default store in the user cache directory ({CACHE_ENV} is not set)",
}


def _describe(spec: StoreSpec) -> dict[str, str]:
    """Where the calls and the values of a store live, for people."""
    files = {"pickle": "pickle files", "cloudpickle": "pickle files (cloudpickle)",
             "dill": "pickle files (dill)", "h5": "HDF5 files"}
    if spec.kind == "memory":
        return {"calls": "memory of this process", "values": "memory of this process"}
    packed = f", {spec.compression}-compressed" if spec.compression else ""
    values = f"{files[spec.format]}{packed} in {spec.values}"
    if spec.kind == "sql" and spec.values is None:
        kind = files[spec.format].replace("files", "entries").replace("HDF5", "pickle")
        values = f"{kind}{packed} in the same database (table fleche_values)"
    elif spec.values_are_objects:
        values = (f"{files[spec.format].replace('files', 'objects')}{packed} in "
                  f"{_object_url(spec.values)}")
    if spec.kind == "objects":
        return {"calls": f"pickle objects in {spec.calls}/calls", "values": values}
    if spec.kind == "directory":
        if spec.resolved_layout() == "index":
            return {"calls": f"SQLite index {spec.calls}/index.sqlite", "values": values}
        calls_format = "HDF5 files" if spec.format == "h5" else "pickle files"
        return {"calls": f"{calls_format} in {spec.calls}/calls", "values": values}
    path = spec.sqlite_path()
    if path is not None:
        return {"calls": f"SQLite database {path}", "values": values}
    dialect = "PostgreSQL" if spec.calls.startswith("postgresql") else "MariaDB/MySQL"
    return {"calls": f"{dialect} database {mask(spec.calls)}", "values": values}


def _object_url(location: str | None) -> str | None:
    """An object store's location without its filesystem options (``None`` stays ``None``)."""
    return location.partition("?")[0] if location else location


def _disk_size(spec: StoreSpec, cache: Cache) -> int | None:
    """Bytes the store takes (``cache.volume()``: files, objects, a SQLite database with its
    journal, what a server database reports); ``None`` where that cannot be said."""
    if spec.kind == "memory":
        return None
    return cache.volume()


# -- showing call records -----------------------------------------------------------------------


def _function(record: DigestedCall) -> str:
    return f"{record.module}.{record.name}" if record.module else record.name


def _runtime(record: DigestedCall) -> dict[str, Any]:
    runtime = (record.metadata or {}).get("runtime")
    return runtime if isinstance(runtime, dict) else {}


def _local_time(iso: Any) -> str:
    if not isinstance(iso, str):
        return ""
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _brief_repr(limit: int) -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = max(limit // 8, 4)
    r.maxlevel = 3
    return r


_BRIEF = _brief_repr(40)
_FULL = _brief_repr(120)


def _value(record: DigestedCall, values: Any, key: Digest, shown: reprlib.Repr) -> tuple[Any, str]:
    """The value under ``key`` (or ``None``), from ``record`` where it keeps the value inline,
    else from ``values``, and its repr for people, ``<missing ...>`` or ``<corrupt ...>`` where
    it cannot be loaded."""
    try:
        value = record.value(key, values.load)
    except KeyError:
        return None, f"<missing value {key[:12]}>"
    except CorruptEntryError:
        return None, f"<corrupt value {key[:12]}>"
    except Exception as e:  # noqa: BLE001 - unpickling or mending a value may raise anything
        return None, f"<unloadable value {key[:12]}: {type(e).__name__}>"
    return value, _shown(value, shown)


def _shown(value: Any, shown: reprlib.Repr) -> str:
    """A value for people: arrays by kind and shape (the numbers only in full views)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if isinstance(shape, tuple) and shape and dtype is not None and not isinstance(value, type):
        head = f"<{type(value).__name__} {dtype} {'x'.join(map(str, shape))}>"
        return head if shown is _BRIEF else f"{head} {shown.repr(value)}"
    return shown.repr(value)


def _json_value(value: Any, text: str) -> Any:
    """``value`` itself when JSON holds it exactly (a str, finite number, bool or None), else its
    repr."""
    if value is None or type(value) in (str, bool, int) or (
        type(value) is float and math.isfinite(value)
    ):
        return value
    return text


# -- commands ------------------------------------------------------------------------------------


def _emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def cmd_info(args: argparse.Namespace) -> int:
    source = None
    if args.spec is None:
        text, source = _default_store()
        spec, cache = _open(text, must_exist=False)
    else:
        spec, cache = _open(args.spec)
    functions: dict[str, int] = {}
    unreadable = 0
    bar = Progress("info", args.progress)
    total = len(list(cache.calls.list())) if bar.enabled else 0  # listed only for the bar
    try:
        for done, (_, record) in enumerate(cache.records(), 1):
            bar.update(min(done, total), total)
            if isinstance(record, CorruptEntryError):
                unreadable += 1
                continue
            name = _function(record)
            functions[name] = functions.get(name, 0) + 1
    finally:
        bar.close()
    n_values = len(list(cache.values.list()))
    n_calls = sum(functions.values()) + unreadable
    where = _describe(spec)
    disk = _disk_size(spec, cache)
    ordered = sorted(functions.items(), key=lambda kv: (-kv[1], kv[0]))
    if args.json:
        _emit_json({
            "spec": mask(str(spec)), "kind": spec.kind, "format": spec.format,
            "calls_in": where["calls"], "values_in": where["values"],
            "n_calls": n_calls, "n_values": n_values, "unreadable_calls": unreadable,
            "size_bytes": disk, "functions": dict(ordered),
            **({} if source is None else {"source": source, "exists": spec.exists()}),
        })
        return 0
    lines = [("store", mask(str(spec)))]
    if source is not None:
        made = "" if spec.exists() else "; nothing stored yet, made on the first save"
        lines.append(("from", _SOURCES[source] + made))
    lines += [
        ("calls", f"{n_calls} in {where['calls']}"),
        ("values", f"{n_values} in {where['values']}"),
        ("size", size(disk)),
    ]
    if unreadable:
        lines.append(("unreadable", f"{count(unreadable, 'call record')} (run: fleche verify)"))
    print(table(None, lines, terminal_width(), flexible=1))
    if ordered:
        print()
        print(table(["function", "calls"], [(f, str(n)) for f, n in ordered], terminal_width(), 0))
    return 0


def _where(items: Sequence[str]) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--where takes ARG=VALUE, got {item!r}")
        try:
            arguments[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            arguments[name] = text
    return arguments


def _name_matches(record: DigestedCall, name: str | None) -> bool:
    return name is None or name in (record.name, _function(record), f"{record.module}:{record.name}")


def _matching(cache: Cache, args: argparse.Namespace) -> list[tuple[Digest, DigestedCall]]:
    """Every readable call record that ``--where`` and ``--name`` select (one pass over them),
    with a note on standard error counting the unreadable ones."""
    template = QueryCall(arguments=_where(args.where) or None)
    found, unreadable = [], 0
    for key, record in cache.records(template):
        if isinstance(record, CorruptEntryError):
            unreadable += 1
        elif _name_matches(record, args.name):
            found.append((key, record))
    if unreadable:
        print(f"skipped {count(unreadable, 'unreadable call record')} (run: fleche verify)",
              file=sys.stderr)
    return found


def _newest(cache: Cache, limit: int) -> list[tuple[Digest, DigestedCall]]:
    """The ``limit`` calls started last, from the store's ``newest`` (evicted or damaged since
    are left out)."""
    found = []
    for key in cache.newest(limit):
        try:
            found.append((key, cache.calls.load(key)))
        except (KeyError, CorruptEntryError):
            continue
    return found


def cmd_ls(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit must be 0 or more, got {args.limit}")
    _, cache = _open(args.spec)
    if args.limit is not None and not args.where and args.name is None:
        found = _newest(cache, args.limit)  # what an index answers without reading every call
    else:
        found = _matching(cache, args)
        found.sort(key=lambda kr: start_text(kr[1]), reverse=True)
        if args.limit is not None:
            found = found[: args.limit]
    keys = [key for key, _ in found]
    shorts: Sequence[Digest] = ()
    if keys:
        shrunk = cache.calls.shrink(*keys)
        shorts = shrunk if isinstance(shrunk, tuple) else (shrunk,)
    rows = []
    for (key, record), short in zip(found, shorts):
        arguments = {
            name: _value(record, cache.values, d, _BRIEF) for name, d in record.arguments.items()
        }
        runtime = _runtime(record)
        rows.append((key, short, record, arguments, runtime))
    if args.json:
        _emit_json([
            {
                "key": key, "short_key": short, "function": record.name, "module": record.module,
                "version": record.version,
                "arguments": {n: _json_value(v, text) for n, (v, text) in arguments.items()},
                "argument_keys": dict(record.arguments), "result_key": record.result,
                "start": runtime.get("start"), "host": runtime.get("host"),
                "pid": runtime.get("pid"), "wall_time": runtime.get("wall_time"),
            }
            for key, short, record, arguments, runtime in rows
        ])
        return 0
    if not rows:
        print("no calls", file=sys.stderr)
        return 0
    cells = [
        (
            short, record.name,
            ", ".join(f"{n}={text}" for n, (_, text) in arguments.items()),
            _local_time(runtime.get("start")), str(runtime.get("host", "")),
            duration(runtime.get("wall_time") if isinstance(runtime.get("wall_time"), (int, float)) else None),
        )
        for _, short, record, arguments, runtime in rows
    ]
    print(table(["key", "function", "arguments", "start", "host", "wall"], cells,
                terminal_width(), flexible=2))
    return 0


def _expand(cache: Cache, text: str) -> Digest:
    try:
        return cache.calls.expand(text)
    except AmbiguousDigestError as e:
        raise UsageError(str(e)) from None
    except KeyError as e:
        raise Failure(f"no call stored under {text!r}") from e
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def cmd_show(args: argparse.Namespace) -> int:
    _, cache = _open(args.spec)
    key = _expand(cache, args.key)
    try:
        record = cache.calls.load(key)
    except KeyError:
        raise Failure(f"no call stored under {args.key!r}") from None
    except CorruptEntryError as e:
        raise Failure(f"the call record is corrupt: {e} (fleche evict or verify --repair)") from None
    arguments = {n: (d, *_value(record, cache.values, d, _FULL)) for n, d in record.arguments.items()}
    result = (record.result, *_value(record, cache.values, record.result, _FULL)) if record.result else None
    if args.json:
        _emit_json({
            "key": key, "function": record.name, "module": record.module,
            "version": record.version, "code_digest": record.code_digest,
            "arguments": {n: {"key": d, "value": _json_value(v, t)} for n, (d, v, t) in arguments.items()},
            "result": None if result is None else {"key": result[0], "value": _json_value(*result[1:])},
            "metadata": record.metadata,
        })
        return 0
    head = [("call", key), ("function", _function(record))]
    if record.version is not None:
        head.append(("version", record.version))
    if record.code_digest is not None:
        head.append(("code", record.code_digest))
    if result is not None:
        head.append(("result", f"{result[2]}  [{result[0][:12]}]"))
    groups = [("", head)]
    groups.append(("arguments", [(f"  {n}", f"{t}  [{d[:12]}]") for n, (d, _, t) in arguments.items()]))
    groups.append(("metadata", [
        (f"  {section}", ", ".join(f"{k}={v!r}" for k, v in entries.items())
         if isinstance(entries, dict) else repr(entries))
        for section, entries in (record.metadata or {}).items()
    ]))
    # One table for all groups, so the values line up; not cut to the terminal (reprs are bounded).
    rows = [row for _, group in groups for row in group]
    lines = iter(table(None, rows, 10_000, flexible=1).split("\n"))
    for title, group in groups:
        if group and title:
            print(title)
        for _ in group:
            print(next(lines))
    return 0


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """Seconds in a duration such as ``90``, ``45s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise UsageError(
            f"--older-than takes a duration like 90s, 30m, 12h, 7d or 2w, got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _selected(cache: Cache, args: argparse.Namespace) -> list[tuple[Digest, str]]:
    """The calls ``evict`` acts on, with their function names: the keys given (each checked
    before anything is evicted), or those ``--name`` and ``--older-than`` select."""
    if args.keys:
        if args.name is not None or args.older_than is not None:
            raise UsageError("give call keys, or --name and/or --older-than, not both")
        chosen = []
        for key in dict.fromkeys(_expand(cache, text) for text in args.keys):
            try:
                chosen.append((key, _function(cache.calls.load(key))))
            except (KeyError, CorruptEntryError):
                chosen.append((key, "?"))
        return chosen
    if args.name is None and args.older_than is None:
        raise UsageError("give the keys of the calls to evict, or --name NAME and/or --older-than AGE")
    cutoff = None if args.older_than is None else time.time() - _duration(args.older_than)
    chosen, unreadable = [], 0
    for key, record in cache.records():
        if isinstance(record, CorruptEntryError):
            unreadable += 1
            continue
        if not _name_matches(record, args.name):
            continue
        if cutoff is not None:
            started = start_time(record)
            if started is None or started.timestamp() >= cutoff:
                continue  # its age unknown, or not old enough: kept
        chosen.append((key, _function(record)))
    if unreadable:
        print(f"skipped {count(unreadable, 'unreadable call record')} (run: fleche verify)",
              file=sys.stderr)
    return chosen


def cmd_evict(args: argparse.Namespace) -> int:
    _, cache = _open(args.spec)
    chosen = _selected(cache, args)
    evicted = []
    for key, name in chosen:
        if not args.dry_run:
            try:
                cache.calls.evict(key)
            except KeyError:
                continue  # evicted meanwhile by someone else
        evicted.append((key, name))
    if args.json:
        _emit_json({"would_evict" if args.dry_run else "evicted": [key for key, _ in evicted]})
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    for key, name in evicted:
        print(f"{verb} {key[:12]}  {name}")
    if args.dry_run:
        print(f"{count(len(evicted), 'call')} to evict (nothing evicted: --dry-run)", file=sys.stderr)
    else:
        print(f"{count(len(evicted), 'call')} evicted; their values stay until: "
              f"fleche gc {mask(args.spec)}", file=sys.stderr)
    return 0


def _confirmed(question: str) -> bool:
    """Whether the person at the terminal answers ``question`` with yes; ``UsageError`` where
    there is no terminal to ask on."""
    if not sys.stdin.isatty():
        raise UsageError("refusing to clear without --yes: standard input is not a terminal "
                         "to confirm on")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_clear(args: argparse.Namespace) -> int:
    spec, cache = _open(args.spec)
    calls, values = len(list(cache.list())), len(list(cache.values.list()))
    before = _disk_size(spec, cache)
    what = f"{count(calls, 'call')} and {count(values, 'value')}"
    if not args.dry_run and not args.yes:
        if not _confirmed(f"remove all {what} of {mask(args.spec)}?"):
            raise Failure("cancelled: nothing removed")
    if args.dry_run:
        removed_calls, removed_values, after = calls, values, before
    else:
        removed_calls = cache.clear()
        removed_values = values - len(list(cache.values.list()))
        after = _disk_size(spec, cache)
    if args.json:
        _emit_json({"dry_run": args.dry_run, "calls": removed_calls, "values": removed_values,
                    "size_before": before, "size_after": None if args.dry_run else after})
        return 0
    if args.dry_run:
        print(f"would remove {what} (nothing removed: --dry-run)")
    else:
        print(f"removed {count(removed_calls, 'call')} and {count(removed_values, 'value')}; "
              f"size {size(before)} -> {size(after)}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    spec, cache = _open(args.spec)
    before = _disk_size(spec, cache)
    bar = Progress("gc", args.progress)
    try:  # removed (or, dry run, to be removed)
        garbage = sorted(cache.gc(dry_run=args.dry_run, progress=bar.update))
    finally:
        bar.close()
    after = None if args.dry_run else _disk_size(spec, cache)
    if args.json:
        _emit_json({"dry_run": args.dry_run, "values": garbage,
                    "size_before": before, "size_after": after})
        return 0
    if args.dry_run:
        print(f"{count(len(garbage), 'value')} no call needs (nothing removed: --dry-run)")
    else:
        print(f"removed {count(len(garbage), 'value')} no call needs; "
              f"size {size(before)} -> {size(after)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _, cache = _open(args.spec)
    bar = Progress("verify", args.progress)
    try:
        report = verify(cache, progress=bar.update)
    finally:
        bar.close()
    repaired = repair(cache, report.problems) if args.repair else []
    unrepaired = [p for p in report.problems if p not in repaired]
    if args.json:
        _emit_json({
            "calls": report.calls, "values": report.values,
            "problems": [
                {"kind": p.kind, "where": p.where, "key": p.key, "reason": p.reason,
                 "repaired": p in repaired}
                for p in report.problems
            ],
        })
    else:
        if report.problems:
            print(table(
                ["problem", "key", "reason"],
                [(f"{p.kind} {p.where}", p.key[:12], p.reason + ("" if p.repairable else
                  " (not evicted: check FLECHE_SECRET_KEY)")) for p in report.problems],
                terminal_width(), flexible=2,
            ))
        print(f"checked {count(report.calls, 'call')} and {count(report.values, 'value')}: "
              f"{count(len(report.problems), 'problem')}"
              + (f", {len(repaired)} evicted" if args.repair else ""))
        if repaired:
            print(f"values no call needs now stay until: fleche gc {mask(args.spec)}")
    return 1 if unrepaired else 0


def cmd_copy(args: argparse.Namespace) -> int:
    src_spec, src = _open(args.src)
    dst_spec, dst = _open(args.dst, must_exist=False)
    bar = Progress("copy", args.progress)
    seen = [0]

    def progress(done: int, total: int) -> None:
        seen[0] = total
        bar.update(done, total)

    try:
        copied = src.transfer(dst, progress=progress)
    except CorruptEntryError as e:
        raise Failure(
            f"stopped at a corrupt entry: {e}; what was copied stays. Run: fleche verify --repair "
            f"{mask(args.src)}, then copy again"
        ) from None
    finally:
        bar.close()
    if args.json:
        _emit_json({"copied": copied, "already_there": seen[0] - copied})
        return 0
    print(f"copied {count(copied, 'call')} from {mask(str(src_spec))} to {mask(str(dst_spec))} "
          f"({seen[0] - copied} already there)")
    return 0


# -- the parser -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleche",
        description="Look inside a fleche store and tend it. SPEC is a directory, "
        "sqlite:///file.db, postgresql://...?values=DIR, mysql://...?values=DIR, an object "
        "store (s3://bucket/prefix, gs://..., az://..., fsspec+PROTOCOL://...; values=s3://... "
        "for SQL stores) or memory://.",
        epilog="Exit status: 0 success, 1 problems found or a failure, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"fleche {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    def json_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="machine-readable output")

    def progress_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                         help="progress bar on standard error (auto: on a terminal)")

    sub = command("info", "where a store is, how many calls and values, size, functions", cmd_info)
    sub.add_argument("spec", metavar="SPEC", nargs="?", help="the store (default: the store "
                     f"decorated functions use without a cache: {CACHE_ENV}, else the user cache)")
    progress_flag(sub)
    json_flag(sub)

    sub = command("ls", "a table of stored calls, newest first", cmd_ls)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("--name", help="only calls of this function (name or module.name)")
    sub.add_argument("--where", action="append", default=[], metavar="ARG=VALUE",
                     help="only calls whose argument ARG equals VALUE (a Python literal, "
                     "else a string); repeatable")
    sub.add_argument("--limit", type=int, metavar="N", help="show the N newest calls")
    json_flag(sub)

    sub = command("show", "one call in full", cmd_show)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("key", metavar="KEY", help="a call key or a unique prefix of 4+ characters")
    json_flag(sub)

    sub = command("evict", "remove calls, by key or by function and age (their values stay "
                  "until gc)", cmd_evict)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("keys", metavar="KEY", nargs="*", help="call keys (unique prefixes work)")
    sub.add_argument("--name", help="the calls of this function (name or module.name)")
    sub.add_argument("--older-than", metavar="AGE",
                     help="calls that started longer ago than AGE (90s, 30m, 12h, 7d, 2w); "
                     "calls without a recorded start are kept")
    sub.add_argument("--dry-run", action="store_true", help="only list them")
    json_flag(sub)

    sub = command("clear", "remove every call and value of a store", cmd_clear)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_argument("--dry-run", action="store_true", help="only count them")
    json_flag(sub)

    sub = command("gc", "remove values no stored call needs", cmd_gc)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("--dry-run", action="store_true", help="only count them")
    progress_flag(sub)
    json_flag(sub)

    sub = command("verify", "load every entry; report corrupt and dangling ones", cmd_verify)
    sub.add_argument("spec", metavar="SPEC")
    sub.add_argument("--repair", action="store_true", help="evict what verify reports")
    progress_flag(sub)
    json_flag(sub)

    sub = command("copy", "copy every call and value DST lacks from SRC", cmd_copy)
    sub.add_argument("src", metavar="SRC")
    sub.add_argument("dst", metavar="DST")
    progress_flag(sub)
    json_flag(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 by itself)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        parser.exit(2, f"fleche {args.command}: error: {e}\n")
    except Failure as e:
        print(f"fleche {args.command}: {e}", file=sys.stderr)
    except BrokenPipeError:  # piped into head, say: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (FlecheError, OSError, ImportError) as e:  # ImportError: an extra not installed
        print(f"fleche {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
