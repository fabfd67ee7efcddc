"""A real S3 API server on 127.0.0.1 for tests and benchmarks: moto's standalone server.

:class:`LocalS3Server` runs ``python -m moto.server`` (``pip install "moto[server]"``, in the
``test`` extra) as a subprocess on a free loopback port, so worker processes reach it as they
would reach S3, through ``s3fs`` and the usual AWS environment variables::

    with LocalS3Server() as server:
        os.environ.update(server.environment())   # endpoint, dummy credentials, region
        server.create_bucket("sweep")
        cache = fleche.open("s3://sweep/run1")

Any access key is accepted and nothing leaves the machine. moto on loopback answers in
milliseconds, but its latency is not a real S3's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from typing import Any

__all__ = ["LocalS3Server", "S3ServerUnavailable"]

_RUNNING = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")


class S3ServerUnavailable(RuntimeError):
    """The local S3 server cannot start here (``moto[server]`` is not installed, or it exited)."""


class LocalS3Server:
    """moto's S3 server in a subprocess on ``127.0.0.1``; a context manager that stops it.

    :meth:`start` returns once the server listens (it prints its address, which a reader
    thread waits for); :meth:`stop` ends the process and waits for it. Not thread-safe.
    """

    region = "us-east-1"

    def __init__(self) -> None:
        self.endpoint: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._output: list[str] = []

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and return its endpoint URL; :class:`S3ServerUnavailable` if it
        cannot start within ``timeout`` seconds."""
        try:
            import moto.server  # noqa: F401 - only to fail early and clearly
        except ImportError as e:
            raise S3ServerUnavailable(
                f"the local S3 server needs moto[server]: pip install 'moto[server]' ({e})"
            ) from None
        process = self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        ready = threading.Event()
        found: list[str] = []

        def read() -> None:  # drains the request log for the server's whole life
            assert process.stdout is not None
            for line in process.stdout:
                if not ready.is_set():
                    self._output.append(line)
                    match = _RUNNING.search(line)
                    if match:
                        found.append(match.group(1))
                        ready.set()
            ready.set()  # the process ended

        threading.Thread(target=read, name="moto-server-output", daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise S3ServerUnavailable(
                "the local S3 server did not start: " + "".join(self._output[-5:]).strip()
            )
        self.endpoint = found[0]
        return self.endpoint

    def environment(self) -> dict[str, str]:
        """Environment variables that point boto3, s3fs (and so fleche) at this server, with
        dummy credentials and no AWS configuration files of the machine."""
        if self.endpoint is None:
            raise RuntimeError("the server is not running: call start() first")
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "fleche-test",
            "AWS_SECRET_ACCESS_KEY": "fleche-test-secret",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3

        env = self.environment()
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str) -> str:
        """Create the bucket ``name`` (buckets are not made by fleche) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """End the server process and wait for it; nothing if it is not running."""
        process, self._process, self.endpoint = self._process, None, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalS3Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
