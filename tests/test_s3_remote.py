"""S3-compatible object storage as a remote (fsspec/s3fs), against moto's S3 server on loopback."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from click.testing import CliRunner

from conftest import add_species_s2, lab_population, needed
from cryopool.cli.main import cli
from cryopool.repo import Repository
from cryopool.repo.errors import ConflictError, IntegrityError
from cryopool.repo.hashing import Kind
from cryopool.repo.merge import merge
from cryopool.repo.records import Operation
from cryopool.repo.remote import add_remote, clone, deferred_objects, fetch, push
from cryopool.repo.transport import FsspecTransport
from cryopool.repo.verify import verify

moto_server = needed("moto.server")
needed("s3fs")
boto3 = needed("boto3")

EDIT = Operation(kind="edit", parameters={}, software="test")


@pytest.fixture(scope="module")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = "pop-" + request.node.name.replace("_", "-")[:40].lower()
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client, f"s3://{name}/population", {"endpoint_url": s3_endpoint}


@pytest.fixture
def lab_a(tmp_path, inputs):
    return lab_population(tmp_path / "lab_a", inputs)


def test_push_clone_fetch_merge_through_s3(bucket, lab_a, tmp_path, inputs):
    client, url, options = bucket
    add_remote(lab_a, "s3", url, options=options)
    stats, cid = push(lab_a, "s3")
    assert stats.objects == len(list(lab_a.store.ids()))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=url.split("/")[2])["Contents"]}
    assert "population/HEAD" in keys and "population/refs/heads/main" in keys  # a bare repository, as on disk
    lab_b = clone(url, str(tmp_path / "lab_b"), options=options)
    assert lab_b.resolve("main") == cid and verify(lab_b).ok
    # lab B adds a species on a branch; only its new objects travel
    lab_b.create_branch("lab-b")
    lab_b.checkout("lab-b")
    new = add_species_s2(lab_b, tmp_path, inputs)
    stats, _ = push(lab_b, "origin", "lab-b")
    assert stats.objects == len(new)
    # lab A fetches, merges and pushes; a stale lab B push is refused
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"a": 1}), message="a", operation=EDIT)
    _, refs = fetch(lab_a, "s3")
    assert refs == {"refs/remotes/s3/lab-b": lab_b.resolve("lab-b")}
    merge(lab_a, "s3/lab-b", policy="keep-both")
    push(lab_a, "s3")
    lab_b.checkout("main")
    lab_b.commit(lambda p: dataclasses.replace(p, metadata={"b": 1}), message="b", operation=EDIT)
    with pytest.raises(ConflictError, match="not a fast-forward"):
        push(lab_b, "origin")
    again = clone(url, str(tmp_path / "again"), options=options)
    assert sorted(again.population().species) == ["S1", "S2"] and verify(again).ok
    assert [c for c, _ in again.log()] == [c for c, _ in lab_a.log()]


def test_ref_updates_are_compare_and_swap(bucket, lab_a):
    client, url, options = bucket
    add_remote(lab_a, "s3", url, options=options)
    _, first = push(lab_a, "s3")
    lab_a.commit(lambda p: dataclasses.replace(p, metadata={"n": 1}), message="1", operation=EDIT)
    second = lab_a.resolve("main")
    push(lab_a, "s3")
    transport = FsspecTransport(url, options)
    with pytest.raises(ConflictError):  # stale expectation
        transport.update_ref("refs/heads/main", first, first)
    with pytest.raises(ConflictError):  # creating a ref that exists
        transport.update_ref("refs/heads/main", None, first)
    # a writer that lands between our read and our write: the conditional write must fail
    bucket_name, key = url.split("/")[2], "population/refs/heads/main"
    real = transport.fs.call_s3

    def racing(method, *args, **kwargs):
        out = real(method, *args, **kwargs)
        if method == "get_object" and kwargs.get("Key") == key:
            client.put_object(Bucket=bucket_name, Key=key, Body=f"{first}\n".encode())  # another lab's force-push
        return out

    transport.fs.call_s3 = racing
    try:
        with pytest.raises(ConflictError, match="moved meanwhile"):
            transport.update_ref("refs/heads/main", second, second)
    finally:
        transport.fs.call_s3 = real
    assert transport.heads()[0]["refs/heads/main"] == first  # the other lab's write stands


def test_damaged_objects_in_the_bucket_are_caught(bucket, lab_a, tmp_path):
    client, url, options = bucket
    add_remote(lab_a, "s3", url, options=options)
    push(lab_a, "s3")
    chunk = next(o for o in lab_a.store.ids() if lab_a.store.info(o).kind == Kind.CHUNK)
    key = f"population/objects/{chunk[:2]}/{chunk[2:]}"
    raw = bytearray(client.get_object(Bucket=url.split("/")[2], Key=key)["Body"].read())
    raw[-1] ^= 1
    client.put_object(Bucket=url.split("/")[2], Key=key, Body=bytes(raw))
    with pytest.raises(IntegrityError, match=chunk):
        clone(url, str(tmp_path / "lab_b"), options=options)


def test_cli_with_an_s3_remote_and_a_partial_clone(bucket, lab_a, tmp_path):
    _, url, options = bucket
    runner = CliRunner()
    endpoint = f"endpoint_url={options['endpoint_url']}"
    result = runner.invoke(cli, ["-C", str(lab_a.work_dir), "remote", "add", "s3", url, "--option", endpoint])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["-C", str(lab_a.work_dir), "push", "s3"])
    assert result.exit_code == 0, result.output
    lab = tmp_path / "lab"
    result = runner.invoke(cli, ["clone", url, str(lab), "--option", endpoint, "--partial"])
    assert result.exit_code == 0, result.output
    repo = Repository.open(lab)
    assert deferred_objects(repo) and verify(repo).ok
    result = runner.invoke(cli, ["-C", str(lab), "fetch", "--deferred"])
    assert result.exit_code == 0, result.output
    assert not deferred_objects(Repository.open(lab))
    result = runner.invoke(cli, ["-C", str(lab), "remote", "add", "bad", url, "--option", "novalue"])
    assert result.exit_code != 0 and "KEY=VALUE" in result.output
