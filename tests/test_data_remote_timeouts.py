"""Object stores and the hub that cannot be reached fail within data.connect_timeout_s, as one line naming the URL
(StoreUnreachable, exit 1), instead of pyarrow retrying for minutes or an httpx traceback; the whole first contact
(an S3 bucket's region lookup included) is bounded, gs:// too; a reachable store still lists with the limits set.
The silent servers are real loopback sockets that accept connections and never answer."""
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3_server import client_env, free_port
from tim_ray.data.records import DataError, StoreUnreachable
from tim_ray.data.sources.filesystem import list_files, s3_attempt_timeout

TIMEOUT_S = 1.0
SLACK_S = 1.5  # thread start and join, the error's formatting


@pytest.fixture
def fake_keys(monkeypatch):
    """Credentials from the environment: without them the AWS SDK would probe the EC2 metadata service first."""
    for name, value in client_env("http://127.0.0.1:1").items():
        if not name.startswith("AWS_ENDPOINT_URL"):
            monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def silent_server():
    """127.0.0.1:PORT that accepts connections and never answers (what a black-holed endpoint looks like)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the socket closed under it at the end
            while True:
                accepted.append(server.accept())

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def _fails_in_one_line(uri: str, within_s: float, kind=StoreUnreachable) -> str:
    started = time.monotonic()
    with pytest.raises(kind) as caught:
        list_files(uri, ("parquet",), timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < within_s
    message = str(caught.value)
    assert "\n" not in message and uri in message
    return message


def test_s3_at_a_closed_loopback_port_fails_at_once_in_one_line(fake_keys):
    uri = f"s3://bucket/data?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    # refused at once and retried with backoff: the tries end first ("Could not connect") or the timeout does
    message = _fails_in_one_line(uri, within_s=TIMEOUT_S + SLACK_S)
    assert "Could not connect" in message or message.endswith("within 1 s (data.connect_timeout_s)"), message


def test_s3_that_never_answers_fails_within_the_timeout(fake_keys):
    """pyarrow's defaults waited ~100 s for one request; the configured timeout now bounds the whole wait."""
    with silent_server() as endpoint:
        uri = f"s3://bucket/data?endpoint_override={endpoint}&scheme=http"
        message = _fails_in_one_line(uri, within_s=TIMEOUT_S + SLACK_S)
    assert message == f"cannot reach '{uri}' within 1 s (data.connect_timeout_s)"


def test_gs_that_never_answers_fails_within_the_timeout():
    """pyarrow's GCS client has no per-request limit (retry_time_limit=2 s still waited 120 s for one request)."""
    with silent_server() as endpoint:
        uri = f"gs://bucket/data?endpoint_override={endpoint}&scheme=http"
        message = _fails_in_one_line(uri, within_s=TIMEOUT_S + SLACK_S)
    assert message.endswith("within 1 s (data.connect_timeout_s)")


def test_the_s3_region_lookup_is_inside_the_timeout(fake_keys):
    """No region= and no endpoint: pyarrow first asks AWS for the bucket's region, a request it does not time
    (offline it took 6.5 s here to fail on DNS). Offline that is StoreUnreachable; with a network AWS may answer
    (no such bucket: a DataError); either way within the timeout."""
    uri = "s3://tim-ray-test-no-such-bucket-3f9c/data"
    started = time.monotonic()
    with pytest.raises((StoreUnreachable, DataError)) as caught:
        list_files(uri, ("parquet",), timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert "\n" not in str(caught.value) and uri in str(caught.value)


def test_hf_uri_without_the_hub_fails_in_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert "cannot reach" in _fails_in_one_line("hf://datasets/owner/name", within_s=TIMEOUT_S + 5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a setting, not the network: bad input (exit 2)
    assert "HF_HUB_OFFLINE is set" in _fails_in_one_line("hf://datasets/owner/name", within_s=2, kind=DataError)


def test_a_reachable_store_lists_with_the_limits_set(s3_server, tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "image": [b"x"]}), tmp_path / "a.parquet")
    uri = s3_server.upload_tree(tmp_path, s3_server.create_bucket(), "data")
    timeout_s = 9.0  # moto on a loaded box can take over a second for its first listing
    files = list_files(uri, ("parquet",), timeout_s=timeout_s)
    assert files.keys == ("a.parquet",)
    in_a_worker = pickle.loads(pickle.dumps(files)).filesystem()  # as Ray hands the source to a decode task
    options = in_a_worker.__reduce__()[1][0]
    assert options["connect_timeout"] == options["request_timeout"] == s3_attempt_timeout(timeout_s) == 3.0
    assert in_a_worker.region == files.filesystem().region  # rebuilt from options: no second region lookup
    assert in_a_worker.get_file_info(f"{files.root}/a.parquet").size > 0


def test_train_on_an_unreachable_store_exits_1_in_one_line_without_hanging(fake_keys, tmp_path):
    """Exit 1 (a runtime failure: the config may be right and the network down), not 2 (bad input), and the
    process ends soon after: pyarrow finishes its in-flight S3 requests before it exits, and their own limits
    (3 tries of 1 s here) bound that."""
    with silent_server() as endpoint:
        uri = f"s3://bucket/data?endpoint_override={endpoint}&scheme=http"
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "tim_ray.cli", "train", "data.source=parquet", f"data.path={uri}",
             f"data.connect_timeout_s={TIMEOUT_S:g}", f"train.output_dir={tmp_path}", "tracking.enabled=false"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        took = time.monotonic() - started
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr == f"tim-ray: error: cannot reach '{uri}' within 1 s (data.connect_timeout_s)\n"
    assert "Traceback" not in out.stdout
    print(f"train against a silent store: exit 1 after {took:.1f} s")
    assert took < 60  # the imports dominate on a loaded 2-core box; the wait itself is ~1 s plus the exit's
