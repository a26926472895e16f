"""A client generated in another language from proto/session.proto alone.

Run by tests/foreign_client.rs: it compiles the .proto with grpcio-tools into a temporary
directory, then runs this script against a live server given as argv[1]. Every check here is
about the wire contract: field names, optional fields, codes.

With `--ca PATH` (a PEM CA certificate) the server is a TLS one: a plaintext channel must be
refused, and every check then runs over TLS, trusting that CA only, with the server certificate
checked for the name `localhost`.

Checks raise explicitly (check below), never with a bare `assert`, so that `python -O`, which
strips asserts, still checks everything; the Rust test runs this script with -O.
"""
import sys

import grpc
from google.protobuf.duration_pb2 import Duration

import session_pb2 as pb
import session_pb2_grpc as rpc


class CheckFailed(Exception):
    """A wire-contract check did not hold."""


def check(condition, message):
    """Raises CheckFailed with message unless condition holds (whatever -O says)."""
    if not condition:
        raise CheckFailed(message)


def code_of(call):
    """The gRPC status code of call(), which must fail."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    raise CheckFailed("expected an error, the call succeeded")


# The checker itself must be live, -O or not.
try:
    check(False, "self-test")
except CheckFailed:
    pass
else:
    raise SystemExit("check() does not raise")

target = sys.argv[1]
ca_path = sys.argv[3] if len(sys.argv) == 4 and sys.argv[2] == "--ca" else None
check(len(sys.argv) == 2 or ca_path is not None, f"usage: ADDR [--ca PATH], not {sys.argv[1:]}")
if ca_path is None:
    channel = grpc.insecure_channel(target)
else:
    plaintext = rpc.SessionStoreStub(grpc.insecure_channel(target))
    code = code_of(lambda: plaintext.Get(pb.GetRequest(namespace="py", id="A" * 32), timeout=20))
    check(code == grpc.StatusCode.UNAVAILABLE, f"plaintext channel to the TLS port: {code}")
    with open(ca_path, "rb") as ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    channel = grpc.secure_channel(target, credentials,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
stub = rpc.SessionStoreStub(channel)

s = stub.Create(pb.CreateRequest(namespace="py", user_id="py-user", attrs={"cart": b"[1]"},
                                 ttl=Duration(seconds=60)))
check(len(s.id) == 32 and s.version == 1 and s.namespace == "py", f"created: {s}")
check(s.ttl.seconds == 60 and s.expires_at.seconds > s.created_at.seconds - 1, f"ttl: {s}")

u = stub.Update(pb.UpdateRequest(namespace="py", id=s.id, set={"x": b"1"}, expected_version=1))
check(u.version == 2, f"updated: {u}")
stale = pb.UpdateRequest(namespace="py", id=s.id, set={"x": b"2"}, expected_version=1)
code = code_of(lambda: stub.Update(stale))
check(code == grpc.StatusCode.ABORTED, f"stale update: {code}")
code = code_of(lambda: stub.Get(pb.GetRequest(id="bad")))
check(code == grpc.StatusCode.INVALID_ARGUMENT, f"malformed id: {code}")
code = code_of(lambda: stub.Get(pb.GetRequest(namespace="py", id="A" * 32)))
check(code == grpc.StatusCode.NOT_FOUND, f"missing session: {code}")

g = stub.Get(pb.GetRequest(namespace="py", id=s.id, touch=True))
check(dict(g.attrs) == {"cart": b"[1]", "x": b"1"}, f"attrs: {g.attrs}")

listed = stub.ListByUser(pb.ListByUserRequest(namespace="py", user_id="py-user"))
check([x.id for x in listed.sessions] == [s.id], f"listed: {listed}")

r = stub.Regenerate(pb.RegenerateRequest(namespace="py", id=s.id))
check(r.id != s.id and dict(r.attrs) == dict(g.attrs), f"regenerated: {r}")
check(stub.Delete(pb.DeleteRequest(namespace="py", id=r.id)).deleted, "first delete: deleted")
check(not stub.Delete(pb.DeleteRequest(namespace="py", id=r.id)).deleted,
      "second delete: nothing there")
print("python client OK" + ("" if ca_path is None else " over TLS"))
