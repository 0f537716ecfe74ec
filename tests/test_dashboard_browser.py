"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

It opens the overview, filters rollouts by status, opens a rollout and its trace, finds the
span names in the tree, and checks that no stored markup ran (``window.pwned`` stays unset,
no dialog opens). A screenshot of each page goes to ``artifacts/dashboard/`` (git-ignored);
``MPSTORE_DASHBOARD_SCREENSHOTS=docs`` writes them there instead, for README.

Runs where ``MPSTORE_TEST_CHROMIUM`` names the browser (CI's .ci/setup.d/50-dashboard.sh
sets it); with it set, a missing browser or driver is a failure, not a skip. Playwright never
downloads a browser here: it launches that executable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="needs mpstore[dashboard]")

from mpstore import Span
from tests.dashboard_env import Dashboard, Filled, fill, running_dashboard
from tests.remote import running_server

CHROMIUM = os.environ.get("MPSTORE_TEST_CHROMIUM")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="MPSTORE_TEST_CHROMIUM is not set")

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / os.environ.get("MPSTORE_DASHBOARD_SCREENSHOTS", "artifacts/dashboard")
#: Chromium flags: headless, sandbox-free (root in CI), and nothing that calls home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dashboard, Filled]]:
    tmp = tmp_path_factory.mktemp("browser")
    with running_server(tmp) as server:
        with server.connect() as client:
            filled = fill(client)
        stop = threading.Event()
        load = threading.Thread(target=_run, args=(server.connect(), stop), daemon=True)
        with running_dashboard(tmp, server.address, "--authkey-file",
                               str(server.authkey_file)) as dash:
            load.start()
            try:
                yield dash, filled
            finally:
                stop.set()
                load.join(10)


def _run(client: Any, stop: threading.Event, seconds: float = 120.0) -> None:
    """A small run while the pages are looked at, so the chart has a curve: rollouts started
    (not queued: the stored ones keep their statuses), 5 spans each, most succeed. Bounded:
    it ends at ``stop`` or after ``seconds``."""
    deadline = time.monotonic() + seconds
    i = 0
    with client:
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            claimed = client.start_rollout({"question": f"What is {i} + {i}?"}, mode="train",
                                           worker_id=f"runner-{4 + i % 3}")
            ids = (claimed.rollout_id, claimed.attempt.attempt_id)
            now = time.time()
            client.add_many_spans([Span(*ids, n, f"step.{n}", start_time=now + n / 100,
                                        end_time=now + (n + 1) / 100) for n in range(1, 6)])
            client.update_attempt(*ids, status="failed" if i % 7 == 0 else "succeeded")
            stop.wait(0.05 + (i % 10) / 100)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    assert CHROMIUM and Path(CHROMIUM).exists(), f"no browser at {CHROMIUM}"
    profile = tempfile.mkdtemp(prefix="mpstore-chromium-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 860})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _shot(page: Any, name: str, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"dashboard-{name}.png"), full_page=full_page)


def _not_pwned(page: Any, dialogs: list[str]) -> None:
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert dialogs == []


def test_a_person_follows_a_run(site: tuple[Dashboard, Filled], browser: Any) -> None:
    dash, filled = site
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    page.goto(dash.url + "/")
    assert page.locator("#count-cancelled").inner_text() == "1"
    # live: the fragment is polled and swapped in without a reload
    page.wait_for_selector("#live[data-refreshes]", state="attached", timeout=15000)
    assert page.locator("#updated").inner_text().startswith("updated ")
    page.wait_for_selector("polyline", state="attached", timeout=15000)
    # a few more refreshes: the chart of the screenshot shows a curve
    page.wait_for_selector("#live[data-refreshes='3']", state="attached", timeout=20000)
    assert page.locator("#store-status").is_hidden()
    _shot(page, "overview")

    page.click("nav >> text=Rollouts")
    page.check("input[name=status][value=running]")
    page.click("form.filters button")
    page.wait_for_url("**/rollouts?*status=running*")
    # the traced rollout, and maybe one of the small run's passing through "running"
    assert filled.traced[0] in page.locator("table.rollouts").inner_text()
    assert set(page.locator("table.rollouts .badge").all_inner_texts()) == {"running"}
    page.uncheck("input[name=status][value=running]")
    page.click("form.filters button")
    _shot(page, "rollouts", full_page=False)  # the first rows are enough
    page.check("input[name=status][value=running]")
    page.click("form.filters button")

    page.click(f"a.rid >> text={filled.traced[0]}")
    page.wait_for_url("**/rollout?id=*")
    assert "runner-1" in page.locator("table.attempts").inner_text()
    # the stored markup is on the page as text
    assert "<script>window.pwned = 1" in page.locator(".values").inner_text()
    _shot(page, "rollout")
    _not_pwned(page, dialogs)

    page.click("a.trace-link")
    page.wait_for_url("**/trace?*")
    names = page.locator("table.tree .span-name").all_inner_texts()
    assert names == [filled.span_names[i] for i in (0, 1, 3, 2)]
    page.locator("table.spans details summary").first.click()  # loads its attributes
    page.wait_for_selector("table.spans details[open] pre", timeout=10000)
    assert "tokens" in page.locator("table.spans details[open] pre").inner_text()
    # an open <details> stays open across a refresh
    page.wait_for_selector("#live[data-refreshes]", state="attached", timeout=15000)
    assert page.locator("table.spans details[open]").count() == 1
    assert "tokens" in page.locator("table.spans details[open] pre").inner_text()
    _shot(page, "trace")
    _not_pwned(page, dialogs)

    for name in ("resources", "runners"):
        page.click(f"nav >> text={name.capitalize()}")
        page.wait_for_url(f"**/{name}")
        _shot(page, name)
    assert "sk-do-not-show" not in page.content()
    _not_pwned(page, dialogs)
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
    page.close()


def test_the_page_says_when_the_store_is_gone(tmp_path: Path, browser: Any) -> None:
    with running_server(tmp_path) as server:
        with running_dashboard(tmp_path, server.address, "--authkey-file",
                               str(server.authkey_file)) as dash:
            page = browser.new_page()
            page.goto(dash.url + "/rollouts")
            assert page.locator("#store-status").is_hidden()
            assert server.stop() == 0
            page.wait_for_selector("#store-status:not(.hidden)", timeout=20000)
            assert "cannot be read" in page.locator("#store-status").inner_text()
            _shot(page, "store-gone")
            started = time.monotonic()
            with running_server(tmp_path, port=server.port):
                page.wait_for_selector("#store-status.hidden", state="attached",
                                       timeout=20000)
                assert time.monotonic() - started < 20
            page.close()


def test_stored_markup_does_not_run_even_without_the_csp(site: tuple[Dashboard, Filled],
                                                         browser: Any) -> None:
    """The escaping alone keeps stored markup inert: the same pages with the CSP header
    removed on the way to the browser, first load and polled refreshes."""
    dash, filled = site
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    def without_csp(route: Any) -> None:
        response = route.fetch()
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() != "content-security-policy"}
        route.fulfill(response=response, headers=headers)

    page.route("**/*", without_csp)
    rollout_id, attempt_id = filled.traced
    for path in (f"/rollout?id={rollout_id}", f"/trace?rollout={rollout_id}&attempt="
                 f"{attempt_id}", "/runners", "/rollouts"):
        page.goto(dash.url + path)
        page.wait_for_selector("#live[data-refreshes]", state="attached", timeout=20000)
        _not_pwned(page, dialogs)
    page.close()
