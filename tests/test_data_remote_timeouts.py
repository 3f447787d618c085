"""Object stores and the hub that cannot be reached fail within data.connect_timeout_s, as one line (a DataError),
instead of pyarrow retrying for minutes or an httpx traceback; a reachable store still lists with the limits set."""
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3_server import client_env, free_port
from tim_ray.data.records import DataError
from tim_ray.data.sources.filesystem import S3_ATTEMPTS, list_files

TIMEOUT_S = 1.0


@pytest.fixture
def fake_keys(monkeypatch):
    """Credentials from the environment: without them the AWS SDK would probe the EC2 metadata service first."""
    for name, value in client_env("http://127.0.0.1:1").items():
        if not name.startswith("AWS_ENDPOINT_URL"):
            monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def _fails_in_one_line(uri: str, within_s: float) -> str:
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        list_files(uri, ("parquet",), timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < within_s
    message = str(caught.value)
    assert "\n" not in message and uri in message
    return message


def test_s3_at_a_closed_loopback_port_fails_at_once_in_one_line(fake_keys):
    uri = f"s3://bucket/data?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    assert "Could not connect" in _fails_in_one_line(uri, within_s=S3_ATTEMPTS * TIMEOUT_S + 5)


def test_s3_that_never_answers_fails_within_the_timeouts(fake_keys):
    """A server that accepts connections and stays silent: pyarrow's defaults waited ~100 s for one request."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.extend(iter(server.accept, None)), daemon=True).start()
    try:
        uri = f"s3://bucket/data?endpoint_override=127.0.0.1:{server.getsockname()[1]}&scheme=http"
        _fails_in_one_line(uri, within_s=S3_ATTEMPTS * TIMEOUT_S + 10)
    finally:
        server.close()


def test_hf_uri_without_the_hub_fails_in_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert "cannot reach" in _fails_in_one_line("hf://datasets/owner/name", within_s=TIMEOUT_S + 5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in _fails_in_one_line("hf://datasets/owner/name", within_s=2)


def test_a_reachable_store_lists_with_the_limits_set(s3_server, tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "image": [b"x"]}), tmp_path / "a.parquet")
    uri = s3_server.upload_tree(tmp_path, s3_server.create_bucket(), "data")
    files = list_files(uri, ("parquet",), timeout_s=TIMEOUT_S)
    assert files.keys == ("a.parquet",) and files.timeout_s == TIMEOUT_S
    options = files.filesystem().__reduce__()[1][0]
    assert options["connect_timeout"] == options["request_timeout"] == TIMEOUT_S
