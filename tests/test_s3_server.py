"""The moto S3 server of conftest.py is real: pyarrow writes, lists and reads parquet through s3:// URIs with only
the environment pointing it there, and boto3 sees the same objects."""
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from s3_server import answers, client_env, moto_s3, s3_env

TABLE = pa.table({"caption": ["a red square", "a blue circle", "a green line"],
                  "image": [b"\x89PNG-1", b"\x89PNG-2", b"\x89PNG-3"]})


def test_pyarrow_writes_lists_and_reads_parquet_through_s3_uris(s3_server):
    bucket = s3_server.create_bucket()
    fs, root = pafs.FileSystem.from_uri(f"s3://{bucket}/shards")  # the endpoint comes from AWS_ENDPOINT_URL
    assert root == f"{bucket}/shards"
    pq.write_table(TABLE, f"{root}/part-0.parquet", filesystem=fs)

    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert [info.path for info in listed] == [f"{bucket}/shards/part-0.parquet"]
    assert s3_server.keys(bucket) == ["shards/part-0.parquet"]  # a second client sees the same object

    fs2, path = pafs.FileSystem.from_uri(f"s3://{bucket}/shards/part-0.parquet")  # a fresh filesystem from a URI
    with fs2.open_input_file(path) as f:
        assert pq.read_table(f).equals(TABLE)


def test_upload_tree_and_endpoint_in_the_uri(s3_server, tmp_path):
    (tmp_path / "sub").mkdir()
    pq.write_table(TABLE, tmp_path / "a.parquet")
    pq.write_table(TABLE.slice(1), tmp_path / "sub" / "b.parquet")
    uri = s3_server.upload_tree(tmp_path, "upload-tree", "data/v1")
    assert uri == "s3://upload-tree/data/v1"
    assert s3_server.keys("upload-tree") == ["data/v1/a.parquet", "data/v1/sub/b.parquet"]

    fs, root = pafs.FileSystem.from_uri(s3_server.uri_with_endpoint(uri))  # the form that needs no environment
    assert pq.read_table(f"{root}/sub/b.parquet", filesystem=fs).equals(TABLE.slice(1))


def test_env_is_restored_and_server_stops(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://example.invalid")  # a value to restore, not just an absence
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    before = dict(os.environ)
    with moto_s3() as endpoint, s3_env(endpoint) as env:
        assert env == client_env(endpoint)
        assert all(os.environ[name] == value for name, value in env.items())
        assert answers(endpoint)
    assert dict(os.environ) == before
    assert not answers(endpoint)
