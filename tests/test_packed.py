"""Packed arguments (``mpstore.manager.wire``): spans of ``add_span``/``add_many_spans`` travel as
field tuples, not as pickled records; whatever is not exactly a Span travels as it is."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from mpstore import InvalidArgument, Span
from mpstore.manager.wire import PACKED_IDENT, PROTOCOL, STORE_IDENT, pack, unpack
from tests.faults import authenticated
from tests.remote import running_server


class MySpan(Span):  # a subclass is the user's own type: sent as it is
    pass


def span(n: int = 0, cls: type = Span) -> Any:
    return cls("ro-1", "at-1", n, f"step-{n}", attributes={"tokens": n, "tags": ["a"]},
               status={"status_code": "OK", "description": None}, start_time=1.0,
               end_time=2.0)


def test_pack_and_unpack_are_inverse() -> None:
    one = span(1)
    assert unpack("add_span", pack("add_span", (one,))) == (one,)
    many = [span(n) for n in range(3)]
    assert unpack("add_many_spans", pack("add_many_spans", (many, "extra"))) == (many, "extra")
    back = unpack("add_span", pack("add_span", (one,)))[0]
    assert type(back) is Span and back is not one


def test_a_packed_request_refers_to_no_class() -> None:
    # The point: no class reference to write and look up on each side.
    data = pickle.dumps((PACKED_IDENT, "add_span", pack("add_span", (span(),)), {}), PROTOCOL)
    assert b"Span" not in data and b"mpstore" not in data


@pytest.mark.parametrize(("name", "args"), [
    ("add_span", ({"rollout_id": "ro-1"},)),           # a dict: the store converts it
    ("add_span", (span(cls=MySpan),)),                 # a subclass
    ("add_many_spans", ([span(), {"name": "x"}],)),    # a mixed list
    ("add_many_spans", ((span(),),)),                  # not a list
    ("get_rollout_by_id", ("ro-1",)),                  # a call that is never packed
    ("add_span", ()),
])
def test_what_is_not_exactly_spans_is_sent_as_it_is(name: str, args: tuple[Any, ...]) -> None:
    assert pack(name, args) is None


@pytest.mark.parametrize(("name", "args"), [
    ("add_span", (("too", "short"),)),
    ("add_span", ("not a tuple",)),
    ("add_many_spans", (("not", "a", "list"),)),
    ("add_many_spans", ([("short",)],)),
    ("get_rollout_by_id", ("ro-1",)),
    ("add_span", "not a tuple"),
])
def test_malformed_packed_arguments_are_refused(name: str, args: Any) -> None:
    with pytest.raises(InvalidArgument):
        unpack(name, args)


def test_the_server_refuses_a_malformed_packed_span_and_stores_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        client = server.connect()
        started = client.start_rollout({"q": 1})
        conn = authenticated(server)
        try:
            conn.send_bytes(pickle.dumps(
                (PACKED_IDENT, "add_span", (("ro-1", "short"),), {}), PROTOCOL))
            kind, error = pickle.loads(conn.recv_bytes())
            assert kind == "#ERROR" and isinstance(error, InvalidArgument)
            assert "malformed packed Span" in str(error)
            # The same connection still serves, packed or not.
            good = span(0)
            good.rollout_id, good.attempt_id = started.rollout_id, started.attempt.attempt_id
            conn.send_bytes(pickle.dumps(
                (PACKED_IDENT, "add_span", pack("add_span", (good,)), {}), PROTOCOL))
            assert pickle.loads(conn.recv_bytes())[0] == "#ARG0"
            conn.send_bytes(pickle.dumps((STORE_IDENT, "ping", (), {}), PROTOCOL))
            assert pickle.loads(conn.recv_bytes())[0] == "#RETURN"
        finally:
            conn.close()
        assert client.query_spans(started.rollout_id) == [good]
        client.close()


def test_spans_sent_packed_or_not_are_stored_alike(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        client = server.connect()
        started = client.start_rollout({"q": 1})
        rid, aid = started.rollout_id, started.attempt.attempt_id
        made = [Span(rid, aid, n, f"s{n}", attributes={"n": n}) for n in range(4)]
        mine = MySpan(rid, aid, 4, "s4")
        assert client.add_span(made[0]) is made[0]          # packed, echoed as given
        assert client.add_many_spans(made[1:3]) == made[1:3]  # packed list
        client.add_many_spans([made[3], {"rollout_id": rid, "attempt_id": aid,
                                         "sequence_id": 5, "name": "d"}])  # as it is
        client.add_span(mine)                                 # a subclass: as it is
        stored = client.query_spans(rid)
        assert [s.name for s in stored] == ["s0", "s1", "s2", "s3", "s4", "d"]
        assert stored[:4] == made and all(type(s) is Span for s in stored[:4])
        client.close()
