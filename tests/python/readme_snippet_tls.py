# Python over TLS with a token: TROVE_CA names the CA's PEM file, TROVE_TOKEN holds the token.
import os
import sys

import grpc
from trove.v1 import artifacts_pb2 as pb, artifacts_pb2_grpc as rpc

with open(os.environ["TROVE_CA"], "rb") as ca:
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca.read()),
        grpc.access_token_call_credentials(os.environ["TROVE_TOKEN"]),  # authorization: Bearer ...
    )
artifacts = rpc.ArtifactsStub(grpc.secure_channel(sys.argv[1], credentials))


def upload(key, value):
    yield pb.PutArtifactRequest(header=pb.PutArtifactHeader(namespace="demo", key=key), data=value)
    yield pb.PutArtifactRequest(finish=True)  # nothing is stored without it


artifacts.Put(upload("greeting", b"hello over TLS from Python"))
reply = artifacts.Get(pb.GetArtifactRequest(namespace="demo", key="greeting"))
print(b"".join(message.data for message in reply).decode())
