"""A client generated in another language from proto/session.proto alone.

Run by tests/foreign_client.rs: it compiles the .proto with grpcio-tools into a temporary
directory, then runs this script against a live server given as argv[1]. Every assertion here is
about the wire contract: field names, optional fields, codes.
"""
import sys

import grpc
from google.protobuf.duration_pb2 import Duration

import session_pb2 as pb
import session_pb2_grpc as rpc

stub = rpc.SessionStoreStub(grpc.insecure_channel(sys.argv[1]))


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    raise SystemExit("expected an error")


s = stub.Create(pb.CreateRequest(namespace="py", user_id="py-user", attrs={"cart": b"[1]"},
                                 ttl=Duration(seconds=60)))
assert len(s.id) == 32 and s.version == 1 and s.namespace == "py", s
assert s.ttl.seconds == 60 and s.expires_at.seconds > s.created_at.seconds - 1, s

u = stub.Update(pb.UpdateRequest(namespace="py", id=s.id, set={"x": b"1"}, expected_version=1))
assert u.version == 2, u
stale = pb.UpdateRequest(namespace="py", id=s.id, set={"x": b"2"}, expected_version=1)
assert code_of(lambda: stub.Update(stale)) == grpc.StatusCode.ABORTED
assert code_of(lambda: stub.Get(pb.GetRequest(id="bad"))) == grpc.StatusCode.INVALID_ARGUMENT
assert code_of(lambda: stub.Get(pb.GetRequest(namespace="py", id="A" * 32))) == grpc.StatusCode.NOT_FOUND

g = stub.Get(pb.GetRequest(namespace="py", id=s.id, touch=True))
assert dict(g.attrs) == {"cart": b"[1]", "x": b"1"}, g.attrs

listed = stub.ListByUser(pb.ListByUserRequest(namespace="py", user_id="py-user"))
assert [x.id for x in listed.sessions] == [s.id], listed

r = stub.Regenerate(pb.RegenerateRequest(namespace="py", id=s.id))
assert r.id != s.id and dict(r.attrs) == dict(g.attrs)
assert stub.Delete(pb.DeleteRequest(namespace="py", id=r.id)).deleted
assert not stub.Delete(pb.DeleteRequest(namespace="py", id=r.id)).deleted
print("python client OK")
