"""Real faults for the tests: small filesystems to fill, read-only mounts, processes without
the privilege to bypass file permissions, and a child process that keeps calling a cached
function on command (see ``fault_tasks``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search"]
"""Runs a command as this user without the capabilities that let root ignore file modes."""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLECHE_CACHE"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)])
    return {**env, **extra}


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (id -u is {os.geteuid()}, not 0)")


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (made), unmounted afterwards; skips the test
    where mounting is impossible."""
    _need_root("mounting a small tmpfs")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``where`` (a read-only bind mount): writes there fail with
    EROFS while ``source`` itself stays as it was."""
    _need_root("a read-only bind mount")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(source), str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip()}")
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until the filesystem is full; return the file."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                block = block[: len(block) // 2]
                if not block:
                    break
    finally:
        os.close(fd)
    return path


class Child:
    """A ``fault_tasks`` process over ``spec``: ``run(a, b)`` makes it call ``f(x)`` for ``x``
    in ``range(a, b)`` and returns its report."""

    def __init__(self, spec: str, *options: str, prefix: list[str] = (), env: dict | None = None):
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fault_tasks", spec, *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env or child_env(), cwd="/",
        )
        self._read()  # ready

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(30)
            raise AssertionError(f"the child died: {self.process.stderr.read()}")
        return json.loads(line)

    def send(self, start: int, stop: int) -> None:
        self.process.stdin.write(f"{start} {stop}\n")
        self.process.stdin.flush()

    def result(self) -> dict:
        return self._read()

    def run(self, start: int, stop: int) -> dict:
        self.send(start, stop)
        return self.result()

    def close(self) -> str:
        """End the child (it exits when its input closes); return what it wrote to stderr."""
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.stderr.read()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
