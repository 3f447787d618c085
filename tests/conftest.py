"""Shared fixtures."""
from __future__ import annotations

import pytest

from s3_server import S3Server, moto_s3, s3_env


@pytest.fixture(scope="session")
def _moto_endpoint():
    """One moto S3 server process for the whole session, started by the first test that needs it."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_server(_moto_endpoint):
    """A real S3-compatible server (moto, on 127.0.0.1) with the client environment set for the module's tests:
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION=us-east-1, AWS_ENDPOINT_URL and
    AWS_ENDPOINT_URL_S3 = the endpoint, AWS_EC2_METADATA_DISABLED=true; the previous environment comes back after
    the module. Yields an `s3_server.S3Server` (.endpoint, .env, .create_bucket(), .upload_tree(dir, bucket,
    prefix) -> "s3://bucket/prefix", .keys(), .client()). The server is shared by the session: use fresh buckets
    (`create_bucket()` with no name gives a unique one). A local Ray started after this fixture inherits the
    environment; see tests/s3_server.py."""
    with s3_env(_moto_endpoint):
        yield S3Server(_moto_endpoint)
