"""A real S3-compatible server for tests: moto's server mode (`moto[server]`, in the `dev` extra) as a subprocess on
127.0.0.1, and the environment that points every S3 client at it.

    with moto_s3() as endpoint:            # "http://127.0.0.1:PORT", stopped by PID on exit
        with s3_env(endpoint):             # AWS_* set for clients, the previous environment restored on exit
            server = S3Server(endpoint)
            uri = server.upload_tree(local_dir, server.create_bucket(), "data")   # -> "s3://bucket/data"
            pyarrow.fs.FileSystem.from_uri(uri)                                  # reaches the moto server

Tests use the `s3_server` fixture of conftest.py instead, which does the above and yields the S3Server.

How each client finds the endpoint (checked with pyarrow 25.0.1, boto3 1.44, moto 5.2.5):
- pyarrow: `pyarrow.fs.FileSystem.from_uri("s3://bucket/prefix")` reads AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)
  from the environment, scheme included ("http://..." gives plain HTTP), and then skips its bucket-region lookup
  (which otherwise goes to <bucket>.s3.<region>.amazonaws.com and fails offline with "Could not resolve host").
  pyarrow reads these variables since version 15, the lower bound in pyproject.toml. Without the environment,
  the URI itself can carry the endpoint: "s3://bucket/prefix?endpoint_override=127.0.0.1:PORT&scheme=http" (also
  checked); `S3Server.uri_with_endpoint` builds that form.
- boto3/botocore: read AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 too; `S3Server.client()` passes the endpoint
  explicitly anyway.
- Ray workers: `ray.init()` that starts a local cluster (tim_ray.train.launch.start_ray) spawns GCS, the raylet and
  through it every worker with the driver's os.environ *at that moment*, so the variables set by `s3_env` before
  ray.init reach Train workers and Ray Data tasks. A Ray started earlier in the same process (or a cluster joined by
  address) does not see them: pass them with `runtime_env={"env_vars": server.env}` instead.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(endpoint: str) -> bool:
    """Whether an HTTP server answers at `endpoint` (any status counts)."""
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:  # any HTTP status means the server is up
        return True
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the server's PID (moto exits cleanly on it), SIGKILL if it is still there after `grace_s`."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def moto_s3(start_timeout_s: float = 60.0, attempts: int = 3) -> Iterator[str]:
    """Start `python -m moto.server` on a free loopback port, wait until it answers HTTP, yield its endpoint URL
    ("http://127.0.0.1:PORT") and stop it by PID at the end. The server's output goes to a temp log file (removed at
    the end) whose tail is in the error if it does not come up. A port taken between picking and binding is retried
    `attempts` times."""
    log_dir = Path(tempfile.mkdtemp(prefix="moto_s3_"))
    try:
        yield from _serve(log_dir, start_timeout_s, attempts)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _serve(log_dir: Path, start_timeout_s: float, attempts: int) -> Iterator[str]:
    for attempt in range(attempts):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = log_dir / f"moto_{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + start_timeout_s
            while proc.poll() is None and not answers(endpoint):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not answer within {start_timeout_s:.0f} s;"
                                       f" its log:\n{_tail(log)}")
                time.sleep(0.2)
            if proc.poll() is not None:  # exited: most likely the port was taken meanwhile
                if attempt + 1 < attempts:
                    continue
                raise RuntimeError(f"moto server exited with code {proc.returncode}; its log:\n{_tail(log)}")
            yield endpoint
            return
        finally:
            _stop(proc)


def client_env(endpoint: str) -> dict[str, str]:
    """The variables that point S3 clients (pyarrow, boto3, s3fs, Ray workers started after them) at `endpoint`.
    AWS_EC2_METADATA_DISABLED keeps the AWS SDK from probing the EC2 metadata service (a timeout off EC2)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_env(endpoint: str) -> Iterator[dict[str, str]]:
    """Set client_env(endpoint) in os.environ (dropping AWS_SESSION_TOKEN / AWS_PROFILE, which would override the
    fake keys) and restore exactly the previous values, or absence, on exit."""
    env = client_env(endpoint)
    touched = [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]
    saved = {name: os.environ.get(name) for name in touched}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class S3Server:
    """A running moto server: its endpoint, the client environment, and bucket/upload helpers (through boto3, a
    client independent of pyarrow, so a test that reads with pyarrow checks pyarrow against the server)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = client_env(endpoint)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when `name` is None: the server lives for the whole test session,
        so tests should not share buckets) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> str:
        """Upload every file under `local_dir` to s3://bucket/prefix/<path relative to local_dir>, creating the
        bucket if it does not exist; return "s3://bucket/prefix"."""
        client, root, prefix = self.client(), Path(local_dir), prefix.strip("/")
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix, path.relative_to(root).as_posix()) if part)
            client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def uri_with_endpoint(self, uri: str) -> str:
        """`uri` with the endpoint in pyarrow's URI query form, for clients that do not get the environment."""
        host = self.endpoint.split("://", 1)[1]
        return f"{uri}{'&' if '?' in uri else '?'}endpoint_override={host}&scheme=http"
