"""``agl dashboard`` over HTTP: every page against a real ``agl store`` holding a rollout in
every status, spans and resources; values shown as text; read-only; store loss and recovery;
bad addresses and keys. The browser test is tests/test_dashboard_browser.py."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

pytest.importorskip("starlette", reason="needs mpstore[dashboard]")
pytest.importorskip("uvicorn", reason="needs mpstore[dashboard]")

from mpstore import Span, StoreClient
from mpstore.dashboard.data import ROLLOUT_STATUSES
from mpstore.manager.ports import free_port
from mpstore.testing import ServerProcess, start_server, write_key_file
from tests.dashboard_env import EVIL, Dashboard, Filled, fetch, fill, running_dashboard
from tests.remote import running_server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dashboard, Filled]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    with running_server(tmp) as server:
        with server.connect() as client:
            filled = fill(client)
        with running_dashboard(tmp, server.address, "--authkey-file",
                               str(server.authkey_file)) as dash:
            yield dash, filled


def get(dash: Dashboard, path: str) -> tuple[int, dict[str, str], str]:
    return fetch(dash.url + path)


def rows(body: str, table: str) -> list[str]:
    """The <tr> blocks of the table with class ``table``'s body."""
    part = body.split(f'<table class="{table}">', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*>.*?</tr>", part.split("<tbody>", 1)[1], flags=re.S)


class _Tags(HTMLParser):
    """Every start tag of a page with its attributes, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_inert(body: str) -> None:
    """No stored markup came through as markup: the only script is the dashboard's own file,
    no element is an <img> or has an on... handler; the stored text is there, escaped."""
    parser = _Tags()
    parser.feed(body)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts in ([], [{"src": "/static/dashboard.js", "defer": None}])
    assert not [tag for tag, _ in parser.tags if tag == "img"]
    assert not [(t, a) for t, a in parser.tags if any(k.startswith("on") for k in a)]
    for markup in EVIL.values():
        assert markup not in body


def test_overview_counts_every_status(site: tuple[Dashboard, Filled]) -> None:
    dash, _ = site
    code, headers, body = get(dash, "/")
    assert code == 200 and headers["x-store-state"] == "up"
    for status in ROLLOUT_STATUSES:
        assert re.search(rf'id="count-{status}">1<', body), status
    assert re.search(r'id="queue-length">2<', body)  # requeuing + queuing
    assert body.count("<svg") == 2 and "finished rollouts" in body
    _, _, fragment = get(dash, "/fragment/overview")
    assert "<html" not in fragment and 'id="count-running">1<' in fragment


def test_rollouts_filter_by_status(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    _, _, body = get(dash, "/rollouts")
    assert len(rows(body, "rollouts")) == len(ROLLOUT_STATUSES)
    for status, rollout_id in filled.by_status.items():
        _, _, page = get(dash, f"/rollouts?status={status}")
        found = rows(page, "rollouts")
        assert len(found) == 1 and rollout_id in found[0], status
        assert f'class="badge s-{status}">{status}<' in found[0]
    _, _, two = get(dash, "/rollouts?status=failed&status=succeeded")
    assert len(rows(two, "rollouts")) == 2


def test_rollouts_search_sort_and_pages(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    target = filled.by_status["failed"]
    _, _, body = get(dash, f"/rollouts?q={target[-6:]}")
    assert [target in r for r in rows(body, "rollouts")] == [True]
    order = list(filled.by_status.values())  # in creation order, but for cancelled/queuing
    _, _, asc = get(dash, "/rollouts?order=asc")
    _, _, desc = get(dash, "/rollouts?order=desc")
    ids_asc = re.findall(r'class="rid" href="/rollout\?id=([^"]+)"', asc)
    ids_desc = re.findall(r'class="rid" href="/rollout\?id=([^"]+)"', desc)
    assert ids_asc == ids_desc[::-1] and set(ids_asc) == set(order)
    assert ids_asc[0] == filled.by_status["running"]  # created first
    _, _, first = get(dash, "/rollouts?order=asc&limit=3")
    _, _, third = get(dash, "/rollouts?order=asc&limit=3&offset=6")
    assert len(rows(first, "rollouts")) == 3 and "1\u20133 of 7" in first
    assert len(rows(third, "rollouts")) == 1 and "7\u20137 of 7" in third
    assert 'rel="next"' in first and 'rel="next"' not in third and 'rel="prev"' in third
    code, _, bad = get(dash, "/rollouts?status=nonsense")
    assert code == 400 and "unknown status" in bad
    assert get(dash, "/rollouts?limit=many")[0] == 400


def test_rollout_page(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    rollout_id, attempt_id = filled.traced
    code, _, body = get(dash, f"/rollout?id={rollout_id}")
    assert code == 200
    # shown, as text (inside JSON strings)
    assert "&lt;script&gt;window.pwned = 1" in body and "&lt;img src=x onerror=" in body
    assert filled.resources_id in body and "max_attempts" in body  # resources id, config
    attempts = rows(body, "attempts")
    assert len(attempts) == 1 and attempt_id in attempts[0] and "runner-1" in attempts[0]
    assert "s-running" in attempts[0]
    assert f"/trace?rollout={rollout_id}&amp;attempt={attempt_id}" in attempts[0]
    _, _, retried = get(dash, f"/rollout?id={filled.by_status['requeuing']}")
    assert "s-failed" in rows(retried, "attempts")[0]
    _, _, queued = get(dash, f"/rollout?id={filled.by_status['queuing']}")
    assert "No attempt yet" in queued
    _, _, missing = get(dash, "/rollout?id=ro-nope")
    assert "No rollout with this id" in missing
    assert get(dash, "/rollout")[0] == 400
    assert_inert(body)


def test_trace_table_and_tree(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    rollout_id, attempt_id = filled.traced
    code, _, body = get(dash, f"/trace?rollout={rollout_id}&attempt={attempt_id}")
    assert code == 200
    tree = rows(body, "tree")
    names = [html.unescape(re.search(r'class="span-name">(.*?)</span>', r).group(1))
             for r in tree]
    root, llm, tool, leaf = filled.span_names
    assert names == [root, llm, leaf, tool]  # depth first, children by start time
    depths = [int(re.search(r'class="depth-(\d+)"', r).group(1)) for r in tree]
    assert depths == [0, 1, 2, 1]
    bars = [(float(x), float(w)) for x, w in
            (re.search(r'<rect x="([\d.]+)" y="1" width="([\d.]+)"', r).groups() for r in tree)]
    assert bars[0] == (0.0, 1000.0)  # the root spans the whole 2 s
    assert bars[1] == (100.0, 500.0) and bars[2] == (150.0, 250.0) and bars[3] == (650.0, 300.0)
    assert "1000.0 ms" in tree[1] and "2000.0 ms" in tree[0]
    table = rows(body, "spans")
    assert len(table) == 4 and "<details" in table[0] and "tokens" not in body  # on demand
    src = html.unescape(re.search(r'data-src="([^"]+)"', table[0]).group(1))
    code, _, attributes = get(dash, src)
    assert code == 200 and "tokens" in attributes and "status_code" in attributes
    assert "&lt;script&gt;window.pwned" in attributes and "<html" not in attributes
    assert_inert(body)
    assert_inert(attributes)
    _, _, page = get(dash, src.replace("/fragment/span", "/span"))
    assert "<html" in page and "tokens" in page
    assert "No span" in get(dash, src.replace("span=", "span=0"))[2]
    assert get(dash, f"/span?rollout={rollout_id}")[0] == 400
    _, _, latest = get(dash, f"/trace?rollout={rollout_id}")
    assert rows(latest, "tree") == tree  # attempt defaults to the latest
    _, _, empty = get(dash, f"/trace?rollout={filled.by_status['queuing']}&attempt=latest")
    assert "No spans for this attempt" in empty


def test_resources_page(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    _, _, body = get(dash, "/resources")
    assert filled.resources_id in body and "badge latest" in body and "version 2" in body
    assert "sk-do-not-show" not in body and "(hidden)" in body and "max_tokens" in body
    _, _, both = get(dash, f"/resources?id={filled.old_resources_id}")
    assert filled.old_resources_id in both and "Q: {q}" in html.unescape(both)
    sections = both.split('<section class="resources">')[1:]
    assert len(sections) == 2 and "badge latest" in sections[0] \
        and "badge latest" not in sections[1]
    _, _, missing = get(dash, "/resources?id=rs-nope")
    assert "No resources with id rs-nope" in missing


def test_runners_page(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    _, _, body = get(dash, "/runners")
    found = rows(body, "runners")
    busy = [r for r in found if "w-busy" in r]
    assert len(busy) == len(filled.workers)
    for worker, rollout_id in filled.workers.items():
        (row,) = [r for r in busy if rollout_id in r]
        assert worker in html.unescape(row)
    if hasattr(StoreClient, "query_workers"):  # the store's workers: the finished ones too
        idle = [r for r in found if "w-idle" in r]
        assert {w for w in filled.idle_workers if any(w in r for r in idle)} == \
            filled.idle_workers
    assert_inert(body)


def test_every_page_is_read_only_and_safe(site: tuple[Dashboard, Filled]) -> None:
    dash, filled = site
    for path in ("/", "/rollouts", f"/rollout?id={filled.traced[0]}", "/resources",
                 "/runners", f"/trace?rollout={filled.traced[0]}",
                 f"/span?rollout={filled.traced[0]}&attempt={filled.traced[1]}&span=x"):
        code, headers, body = get(dash, path)
        assert code == 200, path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert_inert(body)
        import urllib.request

        request = urllib.request.Request(dash.url + path.split("?")[0], method="POST", data=b"")
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError(f"POST {path} was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405, path


def test_foreign_host_names_are_refused(site: tuple[Dashboard, Filled]) -> None:
    """DNS rebinding: a page elsewhere cannot read the dashboard through its own name."""
    dash, _ = site
    assert fetch(dash.url + "/", {"Host": "evil.example"})[0] == 400
    assert fetch(dash.url + "/", {"Host": f"localhost:{dash.port}"})[0] == 200


# ------------------------------------------------------------------ a store that goes away
def test_store_goes_away_and_comes_back(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "authkey")
    server = start_server(authkey_file=key, log_path=tmp_path / "store.log")
    port = server.port
    try:
        with running_dashboard(tmp_path, server.address, "--authkey-file", str(key)) as dash:
            with server.connect() as client:
                client.enqueue_rollout({"q": 1})
            assert fetch(dash.url + "/fragment/overview")[1]["x-store-state"] == "up"
            assert server.stop() == 0
            code, headers, body = fetch(dash.url + "/fragment/rollouts")
            assert code == 200 and headers["x-store-state"] == "down"
            assert "The store cannot be read" in body and server.address in body
            assert "no answer" in unquote(headers["x-store-error"])
            _, _, page = fetch(dash.url + "/")
            assert 'class="banner"' in page and "Retrying" in page
            server = start_server(port, authkey_file=key, log_path=tmp_path / "store.log")
            code, headers, body = fetch(dash.url + "/fragment/overview")
            assert headers["x-store-state"] == "up" and 'id="count-queuing">0<' in body
            log = dash.log()
            assert f"Store unavailable: no answer from the store at {server.address}" in log
            assert f"Store at {server.address} answers again" in log
    finally:
        if isinstance(server, ServerProcess):
            server.stop()


def test_evicted_spans_are_said_so(tmp_path: Path) -> None:
    """A store error (here SpansEvicted) is the store's answer, shown as such: not a banner
    saying the store is away."""
    with running_server(tmp_path, "--eviction-threshold", "20000",
                        "--safe-threshold", "1000") as server:
        with server.connect() as client:
            claimed = client.start_rollout({"q": 1})
            ids = (claimed.rollout_id, claimed.attempt.attempt_id)
            client.update_attempt(*ids, status="succeeded")
            other = client.start_rollout({"q": 2})
            for n in range(1, 40):  # past the threshold: the finished rollout's spans go
                client.add_span(Span(other.rollout_id, other.attempt.attempt_id, n, "big",
                                     attributes={"blob": "x" * 2000}))
                if n == 1:
                    client.add_span(Span(*ids, 1, "first", attributes={"blob": "y" * 2000}))
            assert client.statistics()["evicted_rollouts"] >= 1
        with running_dashboard(tmp_path, server.address, "--authkey-file",
                               str(server.authkey_file)) as dash:
            code, headers, body = fetch(dash.url + f"/trace?rollout={ids[0]}&attempt={ids[1]}")
            assert code == 200 and headers["x-store-state"] == "up"
            assert "SpansEvicted" in body and "The store answered" in body


def test_wrong_key_starts_and_says_so(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        wrong = write_key_file(tmp_path / "wrong")
        with running_dashboard(tmp_path, server.address, "--authkey-file", str(wrong)) as dash:
            code, headers, body = fetch(dash.url + "/rollouts")
            assert code == 200 and headers["x-store-state"] == "down"
            assert "refused the key" in body
            assert "Store unavailable" in dash.log() and "refused the key" in dash.log()


def test_no_store_at_the_address_starts_and_says_so(tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    key = write_key_file(tmp_path / "authkey")
    with running_dashboard(tmp_path, nobody, "--authkey-file", str(key)) as dash:
        code, headers, body = fetch(dash.url + "/")
        assert code == 200 and headers["x-store-state"] == "down"
        assert f"no answer from the store at {nobody}" in html.unescape(body)
        assert f"Store unavailable: no answer from the store at {nobody}" in dash.log()


@pytest.mark.parametrize("args", [["--store", "not an address"], ["--port", "0"],
                                  ["--store", "127.0.0.1:99999"], ["--bogus"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    port = ["--port", str(free_port())]  # should it start after all: not on a default port
    result = subprocess.run([sys.executable, "-m", "mpstore", "dashboard", *port, *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Usage" in result.stderr or "Error" in result.stderr


def test_help_names_the_options() -> None:
    result = subprocess.run([sys.executable, "-m", "mpstore", "dashboard", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--host", "--port", "--store", "--authkey-file", "MPSTORE_AUTHKEY"):
        assert option in result.stdout


def test_url_parameters_are_quoted(site: tuple[Dashboard, Filled]) -> None:
    dash, _ = site
    odd = 'ro-"><script>x</script>&y=1'
    code, _, body = get(dash, f"/rollout?id={quote(odd)}")
    assert code == 200 and "No rollout with this id" in body
    assert "<script>x" not in body
