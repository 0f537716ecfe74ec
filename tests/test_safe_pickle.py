"""Restricted decoding (mpstore.manager.safe_pickle): a key holder's hostile pickles are refused
by the server before anything is built, in every method and nested anywhere in the data, and a
hostile reply is refused by the client. The proof that nothing ran: the payloads write a
marker file when unpickled normally (checked first), and it never appears."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import pickle
import re
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import pytest

from mpstore import LLM, InvalidArgument, PromptTemplate, Span, StoreClient, connect
from mpstore.api import SERVED as REMOTE_METHODS
from mpstore.manager import StoreManager, wire
from mpstore.manager.safe_pickle import AllowList, Refused, method_of
from mpstore.testing import ServerProcess
from tests.remote import running_server


# ----------------------------------------------------------------------------- the payloads
class ViaSystem:
    """``os.system`` via ``__reduce__``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return os.system, (f"touch {self.marker}",)


class ViaEval(ViaSystem):
    def __reduce__(self) -> Any:
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


class ViaPopen(ViaSystem):
    def __reduce__(self) -> Any:
        return subprocess.Popen, (["touch", str(self.marker)],)


class Gadget:
    """A class of this module (importable by the server: it runs from the repository)."""

    def __init__(self, marker: str) -> None:
        Path(marker).touch()


class ViaGadget(ViaSystem):
    def __reduce__(self) -> Any:
        return Gadget, (str(self.marker),)


#: A module that exists only in this process: its function is a global the server lacks.
_ABSENT = types.ModuleType("mpstore_test_absent_module")


def _absent_touch(marker: str) -> None:
    Path(marker).touch()


_absent_touch.__module__, _absent_touch.__qualname__ = _ABSENT.__name__, "touch"
_ABSENT.touch = _absent_touch  # type: ignore[attr-defined]
sys.modules[_ABSENT.__name__] = _ABSENT


class ViaMissing(ViaSystem):
    def __reduce__(self) -> Any:
        return _absent_touch, (str(self.marker),)


PAYLOADS: dict[str, tuple[type[ViaSystem], str]] = {
    "os.system": (ViaSystem, "posix.system"),
    "builtins.eval": (ViaEval, "builtins.eval"),
    "subprocess.Popen": (ViaPopen, "subprocess.Popen"),
    "test-module class": (ViaGadget, "tests.test_safe_pickle.Gadget"),
    "missing global": (ViaMissing, "mpstore_test_absent_module.touch"),
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_are_live(kind: str, tmp_path: Path) -> None:
    """Unpickled normally, each payload writes its marker (else the tests below prove
    nothing); the restricted decoder refuses each, naming the global."""
    cls, name = PAYLOADS[kind]
    marker = tmp_path / "marker"
    data = pickle.dumps({"nested": [cls(marker)]}, pickle.HIGHEST_PROTOCOL)
    with pytest.raises(Refused, match=name.replace(".", r"\.")):
        AllowList.for_requests().loads(data)
    assert not marker.exists()
    result = pickle.loads(data)
    if isinstance(result["nested"][0], subprocess.Popen):
        result["nested"][0].wait()
    assert marker.exists()


# ----------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("safe")) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[StoreClient]:
    with server.connect() as store:
        yield store


def _calls(payload: Any, rollout_id: str, attempt_id: str, resources_id: str
           ) -> list[tuple[str, Callable[[StoreClient], Any]]]:
    """Requests carrying ``payload``: as the first argument of every method, then nested in
    inputs, metadata, span attributes (packed and not) and resources."""
    calls: list[tuple[str, Callable[[StoreClient], Any]]] = [
        (name, lambda c, n=name: getattr(c, n)(payload)) for name in REMOTE_METHODS]
    nested = [payload, {"deep": [(1, payload)]}]
    for value in nested:
        span = Span(rollout_id, attempt_id, 1, "s", attributes={"a": value})
        calls += [
            ("input", lambda c, v=value: c.enqueue_rollout({"task": v})),
            ("input", lambda c, v=value: c.start_rollout([v])),
            ("input", lambda c, v=value: c.enqueue_many_rollouts([{"input": v}])),
            ("metadata", lambda c, v=value: c.enqueue_rollout(1, metadata={"m": v})),
            ("metadata", lambda c, v=value: c.update_rollout(rollout_id, metadata={"m": v})),
            ("metadata", lambda c, v=value: c.update_attempt(rollout_id, attempt_id,
                                                             metadata={"m": v})),
            ("keyword", lambda c, v=value: c.query_rollouts(status=v)),
            ("span attributes", lambda c, s=span: c.add_span(s)),  # packed
            ("span attributes", lambda c, s=span: c.add_many_spans([s, s])),  # packed
            ("span resource", lambda c, v=value: c.add_span(
                Span(rollout_id, attempt_id, 2, "s", resource={"r": v}))),
            ("span as a dict", lambda c, v=value: c.add_span({"attributes": v})),
            ("resources", lambda c, v=value: c.add_resources({"x": v})),
            ("resources", lambda c, v=value: c.add_resources(
                {"llm": LLM("http://e", "m", sampling_parameters={"t": v})})),
            ("resources", lambda c, v=value: c.update_resources(
                resources_id, {"p": PromptTemplate("t"), "x": v})),
        ]
    return calls


@pytest.mark.parametrize("kind", PAYLOADS)
def test_hostile_requests_are_refused_and_nothing_runs(kind: str, client: StoreClient,
                                                       server: ServerProcess,
                                                       tmp_path: Path) -> None:
    cls, name = PAYLOADS[kind]
    marker = tmp_path / "marker"
    rollout = client.start_rollout({"q": 1})
    resources = client.add_resources({"p": PromptTemplate("x")})
    before = client.statistics()
    stored = client.get_rollout_by_id(rollout.rollout_id)
    channel = client._local.channel
    calls = _calls(cls(marker), rollout.rollout_id, rollout.attempt.attempt_id,
                   resources.resources_id)
    for where, call in calls:
        with pytest.raises(InvalidArgument) as info:
            call(client)
        message = str(info.value)
        assert f"contain {name}, which this server does not decode" in message, where
        assert not marker.exists(), f"{kind} ran, sent in {where}"
    assert client._local.channel is channel  # the same connection, still in step
    after = client.statistics()
    assert {k: after[k] for k in ("total_rollouts", "total_spans")} == {
        k: before[k] for k in ("total_rollouts", "total_spans")}
    assert client.get_rollout_by_id(rollout.rollout_id) == stored
    assert client.get_latest_resources().resources_id == resources.resources_id
    assert "Refused a request from 127.0.0.1:" in server.log()
    assert f"enqueue_rollout: the arguments contain {name}" in server.log()


def test_a_refusal_names_the_method(client: StoreClient, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^update_attempt: the arguments contain "
                                              r"posix\.system"):
        client.update_attempt("ro-x", "at-x", metadata={"m": ViaSystem(tmp_path / "m")})
    assert method_of(b"not a pickle") is None


def test_stock_proxies_are_refused_too(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    manager = StoreManager(("127.0.0.1", server.port), authkey=server.authkey)
    manager.connect()
    proxy = manager.get_store()
    with pytest.raises(InvalidArgument, match=r"posix\.system, which this server does not"):
        proxy.enqueue_rollout({"task": ViaSystem(marker)})
    assert not marker.exists()
    assert proxy.ping()["version"]


def test_json_like_data_passes(client: StoreClient) -> None:
    data = {"text": "héllo ✓", "n": [1, 2.5, -3, 10**30, None, True, False],
            "nested": {"a": {"b": [{"c": ""}]}}, "empty": [{}, [], ""],
            "more": (1, 2), "set": {1, 2}, "bytes": b"\x00\xff", "c": 1j}
    rollout = client.enqueue_rollout(data, metadata={"m": data})
    back = client.get_rollout_by_id(rollout.rollout_id)
    assert back.input == data and back.metadata == {"m": data}


def test_allowed_classes_pass_on_both_sides(tmp_path: Path) -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    with running_server(tmp_path, "--allow-class", "datetime.datetime") as server:
        assert "Requests may also contain: datetime.datetime" in server.log()
        with server.connect(allow_classes=[datetime.datetime]) as client:
            rollout = client.enqueue_rollout({"when": when})
            assert rollout.input == {"when": when}
            with pytest.raises(InvalidArgument, match=r"datetime\.date, which this server"):
                client.enqueue_rollout({"day": when.date()})
        with server.connect() as plain:  # this client does not decode datetimes
            with pytest.raises(InvalidArgument, match=r"^get_rollout_by_id: the server's "
                                                      r"reply contains datetime\.datetime"):
                plain.get_rollout_by_id(rollout.rollout_id)
            assert plain.ping()  # the reply was read whole: still in step
            with pytest.raises(InvalidArgument, match=r"cannot allow 'no_such\.Thing'"):
                connect(server.address, server.authkey, allow_classes=["no_such.Thing"])


def test_a_pickled_client_keeps_its_allow_list(server: ServerProcess) -> None:
    client = server.connect(allow_classes=["datetime.date"])
    copy = pickle.loads(pickle.dumps(client))
    assert copy._allow_classes == ("datetime.date",)
    day = datetime.date(2026, 1, 2)
    assert copy._loads(pickle.dumps((wire.RETURN, day))) == (wire.RETURN, day)
    with pytest.raises(Refused):
        server.connect()._loads(pickle.dumps((wire.RETURN, day)))


def test_a_bad_allow_class_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mpstore", "store", "--port", "1",
                             "--allow-class", "no_such_module.Thing"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot allow 'no_such_module.Thing'" in result.stderr


def test_unknown_exception_classes_travel_as_runtime_errors() -> None:
    class Private(Exception):
        pass

    try:
        raise Private("it broke")
    except Private as exc:
        data = wire.dump_error(exc)
    kind, error = AllowList.for_replies().loads(data)
    assert kind == wire.ERROR and type(error) is RuntimeError
    assert str(error) == f"{Private.__module__}.{Private.__qualname__}: it broke"
    assert error.__traceback__ is not None  # the server-side frames are kept


# ----------------------------------------------------------------------------- the client
@contextlib.contextmanager
def fake_server(replies: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """A server that authenticates like mpstore's and answers each request with the next of
    ``replies`` (a hostile server cannot be a real one)."""
    key = os.urandom(16)
    listener = Listener(("127.0.0.1", 0), authkey=key)

    def serve() -> None:
        with contextlib.suppress(OSError, EOFError), listener.accept() as conn:
            conn.recv_bytes()  # the client's wire version; say ours, as mpstore's server does
            conn.send_bytes(wire.hello())
            for reply in replies:
                conn.recv_bytes()
                conn.send_bytes(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    host, port = listener.address
    try:
        yield f"{host}:{port}", key
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_hostile_reply_is_refused_by_the_client(kind: str, tmp_path: Path) -> None:
    cls, name = PAYLOADS[kind]
    marker = tmp_path / "marker"
    dump = pickle.HIGHEST_PROTOCOL
    replies = [pickle.dumps((wire.RETURN, {"x": [cls(marker)]}), dump),
               pickle.dumps((wire.ERROR, cls(marker)), dump),
               pickle.dumps((wire.RETURN, {"ok": True}), dump)]
    with fake_server(replies) as (address, key):
        client = connect(address, key, retry_for=0, timeout=10)
        for method in ("ping", "statistics"):
            with pytest.raises(InvalidArgument, match=rf"^{method}: the server's reply "
                                                      rf"contains {re.escape(name)}"):
                getattr(client, method)()
            assert not marker.exists()
        assert client.ping() == {"ok": True}  # still in step
        client.close()
