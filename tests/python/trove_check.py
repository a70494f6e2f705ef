"""Exercises every Trove service from Python, with stubs generated from
proto/ at run time by the standard gRPC tools.

Usage: python trove_check.py PROTO_ROOT HOST:PORT
Prints one line per check and ends with "N passed, M failed".
"""

import hashlib
import os
import sys
import tempfile
import traceback

import grpc
from grpc_tools import protoc


def generate_stubs(proto_root: str, out_dir: str) -> None:
    """Compiles every trove.v1 file into out_dir (messages and gRPC stubs)."""
    files = sorted(
        os.path.join("trove", "v1", name)
        for name in os.listdir(os.path.join(proto_root, "trove", "v1"))
        if name.endswith(".proto")
    )
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")


def main() -> int:
    proto_root, addr = sys.argv[1], sys.argv[2]
    out_dir = tempfile.mkdtemp(prefix="trove-py-stubs-")
    generate_stubs(proto_root, out_dir)
    sys.path.insert(0, out_dir)
    from trove.v1 import artifacts_pb2 as apb, artifacts_pb2_grpc as agrpc  # noqa: E402
    from trove.v1 import cache_pb2 as cpb, cache_pb2_grpc as cgrpc  # noqa: E402
    from trove.v1 import entries_pb2 as epb, entries_pb2_grpc as egrpc  # noqa: E402
    from trove.v1 import objects_pb2 as opb, objects_pb2_grpc as ogrpc  # noqa: E402
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

    channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    objects, artifacts = ogrpc.ObjectsStub(channel), agrpc.ArtifactsStub(channel)
    entries, cache = egrpc.EntriesStub(channel), cgrpc.CacheStub(channel)
    ns = "python-" + os.urandom(6).hex()

    def expect_code(code, call):
        try:
            call()
        except grpc.RpcError as err:
            assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
            return err
        raise AssertionError(f"expected {code}, the call succeeded")

    def check_health():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply

    def check_reflection():
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        for want in ["trove.v1.Objects", "trove.v1.Artifacts", "trove.v1.Entries", "trove.v1.Cache"]:
            assert want in names, names

    def check_objects():
        data = os.urandom(3 * 1024 * 1024)
        digest = hashlib.sha256(data).hexdigest()

        def upload(hash_, body):
            yield opb.PutObjectRequest(header=opb.PutObjectHeader(namespace=ns, hash=hash_))
            for i in range(0, len(body), 1 << 20):
                yield opb.PutObjectRequest(data=body[i : i + (1 << 20)])
            yield opb.PutObjectRequest(finish=True)

        info = objects.Put(upload(digest, data)).info
        assert info.verified and info.size == len(data), info
        got = b"".join(m.data for m in objects.Get(opb.GetObjectRequest(namespace=ns, hash=digest)))
        assert got == data, "object round trip"
        assert objects.Stat(opb.StatObjectRequest(namespace=ns, hash=digest)).info.sha256 == digest
        missing = objects.FindMissing(opb.FindMissingRequest(namespace=ns, hashes=[digest, "nope"])).missing
        assert list(missing) == ["nope"], missing
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: objects.Put(upload("0" * 64, b"not zeros")))
        assert objects.Delete(opb.DeleteObjectRequest(namespace=ns, hash=digest)).existed
        err = expect_code(grpc.StatusCode.NOT_FOUND, lambda: b"".join(
            m.data for m in objects.Get(opb.GetObjectRequest(namespace=ns, hash=digest))))
        assert "not found" in err.details()

    def check_streams():
        chunks = [opb.StreamChunk(data=b"a", timestamp=5), opb.StreamChunk(data=b""), opb.StreamChunk(data=b"c", timestamp=-1)]

        def upload():
            yield opb.PutStreamRequest(header=opb.PutStreamHeader(namespace=ns, hash="sse-1"), chunks=chunks)
            yield opb.PutStreamRequest(finish=True)

        assert objects.PutStream(upload()).info.chunk_count == 3
        got = [c for m in objects.GetStream(opb.GetStreamRequest(namespace=ns, hash="sse-1")) for c in m.chunks]
        assert [(c.data, c.HasField("timestamp"), c.timestamp) for c in got] == [
            (b"a", True, 5), (b"", False, 0), (b"c", True, -1)], got

    def check_artifacts():
        def put(key, value):
            yield apb.PutArtifactRequest(header=apb.PutArtifactHeader(namespace=ns, key=key, content_type="application/json"), data=value)
            yield apb.PutArtifactRequest(finish=True)

        for i in range(3):
            artifacts.Put(put(f"variants/{i}", f'{{"w":{i}}}'.encode()))
        page = artifacts.List(apb.ListArtifactsRequest(namespace=ns, prefix="variants/", with_values=True))
        assert [(a.info.key, a.value) for a in page.artifacts] == [
            (f"variants/{i}", f'{{"w":{i}}}'.encode()) for i in range(3)], page
        got = b"".join(m.data for m in artifacts.Get(apb.GetArtifactRequest(namespace=ns, key="variants/1")))
        assert got == b'{"w":1}'
        assert artifacts.Delete(apb.DeleteArtifactRequest(namespace=ns, key="variants/1")).existed
        assert not artifacts.Delete(apb.DeleteArtifactRequest(namespace=ns, key="variants/1")).existed
        err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: artifacts.Put(put("", b"x")))
        assert "key" in err.details(), err.details()
        expect_code(grpc.StatusCode.NOT_FOUND, lambda: artifacts.Stat(apb.StatArtifactRequest(namespace=ns, key="missing")))

    def check_entries():
        cassette = "python/test_login.json"
        for batch in [[30, 10], [20]]:
            entries.Append(epb.AppendRequest(namespace=ns, cassette=cassette, entries=[
                epb.Entry(json=f'{{"n":{t}}}'.encode(), recorded_at=t) for t in batch]))
        read = [e.recorded_at for m in entries.Read(epb.ReadRequest(namespace=ns, cassette=cassette)) for e in m.entries]
        assert read == [10, 20, 30], read
        assert entries.Exists(epb.ExistsRequest(namespace=ns, cassette=cassette)).exists

        def replace():
            yield epb.ReplaceRequest(header=epb.ReplaceHeader(namespace=ns, cassette=cassette))
            yield epb.ReplaceRequest(entries=[epb.Entry(json=b'{"recorded_at":1}')], finish=True)

        assert entries.Replace(replace()).count == 1
        names = entries.List(epb.ListCassettesRequest(namespace=ns, prefix="python/")).cassettes
        assert list(names) == [cassette], names
        err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: entries.Append(
            epb.AppendRequest(namespace=ns, cassette=cassette, entries=[epb.Entry(json=b"[1]")])))
        assert "JSON object" in err.details(), err.details()
        assert entries.Delete(epb.DeleteCassetteRequest(namespace=ns, cassette=cassette)).existed
        assert not entries.Exists(epb.ExistsRequest(namespace=ns, cassette=cassette)).exists

    def check_cache():
        main = cpb.CacheScope(namespace=ns, prefix="ci", branch="main", default_branch="main")
        pr = cpb.CacheScope(namespace=ns, prefix="ci", branch="feature/x", default_branch="main")

        def upload(scope, ref, body):
            yield cpb.UploadRequest(header=cpb.UploadHeader(scope=scope, ref=ref), data=body)
            yield cpb.UploadRequest(finish=True)

        cache.Upload(upload(main, "c1", b"archive-bytes"))
        replies = list(cache.Download(cpb.DownloadRequest(scope=pr, ref="c1")))
        assert replies[0].found and replies[0].served.tier == cpb.TIER_MAIN, replies[0]
        assert b"".join(r.data for r in replies) == b"archive-bytes"
        miss = list(cache.Download(cpb.DownloadRequest(scope=pr, ref="")))
        assert len(miss) == 1 and not miss[0].found, miss
        cache.WriteBranchRefs(cpb.WriteBranchRefsRequest(namespace=ns, prefix="ci", branch="feature/x", default_branch="main", refs={"c1": 17}))
        refs = cache.BranchRefs(cpb.BranchRefsRequest(namespace=ns, prefix="ci", branch="feature/x")).refs
        assert dict(refs) == {"c1": 17}, refs
        cache.Upload(upload(main, "c2", b"newer"))
        assert cache.Prune(cpb.PruneRequest(scope=main, count=1)).removed == 1
        assert [r.ref for r in cache.ListRefs(cpb.ListRefsRequest(scope=main)).refs] == ["c2"]
        err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: cache.Upload(upload(main, "", b"x")))
        assert "ref" in err.details(), err.details()

    checks = [check_health, check_reflection, check_objects, check_streams, check_artifacts, check_entries, check_cache]
    passed = failed = 0
    for check in checks:
        try:
            check()
            passed += 1
            print(f"ok   {check.__name__}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
