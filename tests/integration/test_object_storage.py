"""The lake and MLflow's artifact store on S3, against moto's S3 emulator (a stand-in for the real object store,
which is outside this machine) on a free port: partitions written, read and replaced through the manifest with
no partial partition ever visible, and an MLflow server started by the stack keeping artifacts in the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import pyarrow as pa
import pytest

from pipeline.ops import stack
from tests.helpers import free_port, make_settings

BUCKET = "flywheel-test"
DAY = date(2026, 3, 1)
CREDS = {"AWS_ACCESS_KEY_ID": "emulator-key", "AWS_SECRET_ACCESS_KEY": "emulator-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 emulator with one bucket; the process env points pyarrow and boto3 at it, as the stack's does."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**CREDS, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    server.stop()


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"x": pa.array(range(offset, offset + n), pa.int64()), "y": pa.array([0.5] * n)})


def _keys(client, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_partition_write_read_and_replace_on_s3(s3, tmp_path):
    from feature_store.offline import MANIFEST, Lake

    _, client = s3
    lake = Lake(f"s3://{BUCKET}/lake1")
    lake.write_partition("training", DAY, _table(100), inputs={"source": "test"})
    assert lake.partition_days("training") == [DAY]
    assert lake.read_partition("training", DAY).column("x").to_pylist() == list(range(100))
    manifest = lake.read_manifest("training", DAY)
    assert manifest["rows"] == 100 and manifest["inputs"] == {"source": "test"}

    lake.write_partition("training", DAY, _table(30, offset=1000))
    assert lake.read_partition("training", DAY).column("x").to_pylist() == list(range(1000, 1030))
    keys = _keys(client, "lake1/training/")
    assert f"lake1/training/dt={DAY}/{MANIFEST}" in keys and f"lake1/training/dt={DAY}/part-0.parquet" in keys
    assert not [k for k in keys if "/.tmp-" in k], f"temp objects left behind: {keys}"


def test_a_failed_write_leaves_no_partition_visible(s3):
    from feature_store.offline import Lake

    lake = Lake(f"s3://{BUCKET}/lake2")
    writer = lake.partition_writer("validated", DAY, _table(1).schema)
    writer.write(_table(50))
    writer.abort()
    assert lake.partition_days("validated") == [] and lake.read_manifest("validated", DAY) is None
    with pytest.raises(FileNotFoundError, match="no complete partition"):
        lake.read_partition("validated", DAY)
    final = lake.partition_path("validated", DAY)
    lake.fs.create_dir(final)  # data without its manifest, as a crash mid-copy leaves it: not a partition
    with lake.fs.open_output_stream(f"{final}/part-0.parquet") as f:
        f.write(lake.parquet_bytes(_table(5)))
    assert lake.partition_days("validated") == []
    with pytest.raises(FileNotFoundError, match="no complete partition"):
        lake.read_partition("validated", DAY)


CRASH = """
import sys
from datetime import date
import pyarrow as pa
from feature_store.offline import Lake
lake = Lake(sys.argv[1])
lake.write_partition("training", date(2026, 3, 1), pa.table({"x": pa.array(range(7), pa.int64())}))
"""


@pytest.mark.parametrize("point", ["before_rename", "between_renames"])
def test_a_crash_while_replacing_shows_the_old_partition_or_none_never_a_mix(s3, point):
    from feature_store.offline import Lake

    root = f"s3://{BUCKET}/lake-{point}"
    lake = Lake(root)
    lake.write_partition("training", DAY, pa.table({"x": pa.array(range(100), pa.int64())}))
    env = {**os.environ, "PYTHONPATH": str(stack.REPO), "FLYWHEEL_FAULT_AT": f"training.{point}"}
    out = subprocess.run([sys.executable, "-c", CRASH, root], env=env, cwd=stack.REPO, capture_output=True, text=True)
    assert out.returncode == 86, out.stderr[-2000:]
    if point == "before_rename":
        assert lake.read_partition("training", DAY).num_rows == 100
    else:
        assert lake.read_manifest("training", DAY) is None and lake.partition_days("training") == []
    lake.write_partition("training", DAY, pa.table({"x": pa.array(range(7), pa.int64())}))
    assert lake.read_partition("training", DAY).num_rows == 7


def test_mlflow_server_keeps_artifacts_in_the_bucket(s3, tmp_path):
    from mlflow import MlflowClient

    endpoint, client = s3
    s = make_settings(tmp_path / "home", free_port(), s3_endpoint_url=endpoint,
                      mlflow_artifacts_uri=f"s3://{BUCKET}/mlflow")
    assert stack.object_storage_env(s)["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    try:
        stack.start_mlflow(s)
        ml = MlflowClient(s.mlflow_tracking_uri)
        run = ml.create_run(ml.create_experiment("s3-artifacts"))
        ml.log_text(run.info.run_id, "warm start from v3", "notes/lineage.txt")
        keys = _keys(client, "mlflow/")
        assert any(k.endswith("notes/lineage.txt") for k in keys), keys
        local = ml.download_artifacts(run.info.run_id, "notes/lineage.txt", str(tmp_path))
        assert open(local).read() == "warm start from v3"
    finally:
        stack.stop_all(s)
