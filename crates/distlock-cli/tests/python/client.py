"""A distlock client in Python, made from distlock.proto alone.

Usage: client.py HOST:PORT PROTO_DIR

Generates the gRPC code at run time, opens a session, acquires, checks the
token, releases, closes; then sends a garbled request and checks that the
server refuses it and keeps serving.
"""

import atexit
import os
import queue
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate(proto_dir):
    # Removed at exit, not before: the generated modules are imported from it.
    scratch = tempfile.TemporaryDirectory()
    atexit.register(scratch.cleanup)
    out = scratch.name
    status = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_dir, "distlock.proto"),
        ]
    )
    assert status == 0, f"protoc failed with {status}"
    sys.path.insert(0, out)


def main(address, proto_dir):
    generate(proto_dir)
    import distlock_pb2 as pb
    import distlock_pb2_grpc as rpc

    channel = grpc.insecure_channel(address)
    stub = rpc.LocksStub(channel)

    requests = queue.Queue()

    def outgoing():
        while (request := requests.get()) is not None:
            yield request

    events = stub.Session(outgoing())

    def ask(request, expected):
        requests.put(request)
        event = next(events)
        assert event.id == request.id, event
        assert event.WhichOneof("body") == expected, event
        return event

    ask(pb.SessionRequest(id=1, open=pb.Open(ttl_ms=5000)), "opened")
    acquire = pb.Acquire(key="python/lock", mode=pb.MODE_EXCLUSIVE, wait_ms=1000)
    token = ask(pb.SessionRequest(id=2, acquire=acquire), "granted").granted.token
    assert token > 0
    assert stub.Check(pb.CheckRequest(key="python/lock", token=token)).current
    ask(pb.SessionRequest(id=3, release=pb.Release(key="python/lock")), "released")
    assert not stub.Check(pb.CheckRequest(key="python/lock", token=token)).current
    ask(pb.SessionRequest(id=4, close=pb.Close()), "closed")
    requests.put(None)

    garbled = channel.unary_unary("/distlock.v1.Locks/Check")
    try:
        garbled(b"\xff\xff\xff\xff\x0fnot protobuf")
        raise AssertionError("the server accepted a garbled request")
    except grpc.RpcError as error:
        print(f"garbled request refused: {error.code()}: {error.details()}")
        assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), error

    counters = stub.Status(pb.StatusRequest()).counters
    assert counters.grants >= 1, counters
    print(f"ok token {token}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
