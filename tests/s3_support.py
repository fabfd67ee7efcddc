"""Fixtures for tests against a real S3 API server (moto's) that the tests start and stop.

The fixtures reach every test module through ``pytest_plugins`` in ``conftest.py``: each
module starts one server on a free loopback port and stops it when its tests are done. Where
the server cannot start (``moto[server]`` or ``s3fs`` missing) the tests skip saying why, unless
``FLECHE_TEST_S3=required`` (as ``.ci/run`` sets it), where they fail instead.
"""

from __future__ import annotations

import os
import uuid

import pytest

from fleche.testing_s3 import LocalS3Server, S3ServerUnavailable

REQUIRED = os.environ.get("FLECHE_TEST_S3", "").lower() == "required"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"FLECHE_TEST_S3=required, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def s3_server():
    """A running local S3 server, for this module's tests."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        _unavailable("the S3 tests need s3fs: pip install 'fleche[s3]'")
    server = LocalS3Server()
    try:
        server.start()
    except S3ServerUnavailable as e:
        _unavailable(str(e))
    # fsspec keeps one S3FileSystem per set of arguments for the process's life; one made for an
    # earlier module's server (found through the environment) must not be used for this one.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server, with this process's environment (and so its child processes') pointing
    boto3 and s3fs at it."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3):
    """A new, empty bucket on the server."""
    return s3.create_bucket(f"fleche-{uuid.uuid4().hex[:16]}")
