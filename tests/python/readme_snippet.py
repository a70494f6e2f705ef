# Python: generate stubs with `python -m grpc_tools.protoc -I proto/proto
# --python_out=. --grpc_python_out=. proto/proto/trove/v1/*.proto`, then:
import sys

import grpc
from trove.v1 import artifacts_pb2 as pb, artifacts_pb2_grpc as rpc

artifacts = rpc.ArtifactsStub(grpc.insecure_channel(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))


def upload(key, value):
    yield pb.PutArtifactRequest(header=pb.PutArtifactHeader(namespace="demo", key=key), data=value)
    yield pb.PutArtifactRequest(finish=True)  # nothing is stored without it


artifacts.Put(upload("greeting", b"hello from Python"))
reply = artifacts.Get(pb.GetArtifactRequest(namespace="demo", key="greeting"))
print(b"".join(message.data for message in reply).decode())
