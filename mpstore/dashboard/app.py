"""The dashboard's web application: Starlette routes rendering Jinja2 templates.

Every page is a full HTML page at ``/...`` and the same content as a fragment at
``/fragment/...``, which the page's script polls and swaps in (no full reload). Every
response says whether the store answered (``X-Store-State: up|down``, and the reason in
``X-Store-Error``, percent-encoded) so the page can show a banner while it is away.

Read-only: only GET routes. Every store value is rendered by an autoescaping template, and
the Content-Security-Policy allows scripts only from the dashboard's own static file, so a
stored ``<script>`` is text twice over.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import InvalidArgument, StoreError
from . import views
from .data import ROLLOUT_STATUSES, Source, StoreDown
from .history import History, chart

__all__ = ["LOOPBACK_NAMES", "create_app"]

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: Host names a loopback-bound dashboard answers to (anything else: 400, against DNS
#: rebinding: a web page elsewhere must not read the dashboard through a name it controls).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Rows per rollouts page by default, and the most a request may ask for.
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
#: How often each kind of fragment is polled, in milliseconds.
POLL_MS = {"overview": 2000, "rollouts": 3000, "rollout": 3000, "trace": 5000,
           "span": 10000, "resources": 5000, "runners": 3000}

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(href=views.href, as_json=views.as_json, masked=views.masked,
                       timestamp=views.timestamp, duration=views.duration,
                       statuses=ROLLOUT_STATUSES, version=__version__, poll_ms=POLL_MS)
    return env


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name, "")
    try:
        return min(max(int(text), low), high) if text else default
    except ValueError:
        raise InvalidArgument(f"{name} must be a whole number, not {text!r}") from None


class Pages:
    """The routes, bound to one store :class:`Source` and its :class:`History`."""

    def __init__(self, source: Source, history: History) -> None:
        self.source, self.history, self.env = source, history, _environment()

    # ---------------------------------------------------------------- plumbing
    def render(self, request: Request, name: str, fragment: bool,
               read: Callable[[Request], dict[str, Any]]) -> Response:
        """The page ``name`` (or only its fragment): ``read`` gathers the template's values;
        if the store cannot be read, the page says why instead of failing."""
        try:
            values, body, error, status = read(request), name, None, 200
        except StoreDown as exc:
            values, body, error, status = {}, "down", str(exc), 200
        except InvalidArgument as exc:
            values, body, error, status = {"message": str(exc), "title": "Bad request"}, \
                "invalid", None, 400
        except StoreError as exc:  # e.g. SpansEvicted: the store answered, with a refusal
            values, body, error, status = {"message": f"{type(exc).__name__}: {exc}",
                                           "title": "The store answered"}, "invalid", None, 200
        context = {"request": request, "error": error, "store": self.source.address,
                   "section": name, "body": f"_{body}.html", **values}
        if fragment:
            html = self.env.get_template(f"_{body}.html").render(context)
        else:
            query = request.url.query
            context["poll_url"] = (f"/fragment/{name}" + (f"?{query}" if query else ""))
            html = self.env.get_template("page.html").render(context)
        headers = {**_HEADERS, "X-Store-State": "down" if error else "up"}
        if error:
            headers["X-Store-Error"] = quote(error)
        return HTMLResponse(html, status_code=status, headers=headers)

    def routes(self) -> list[Route]:
        table = [("/", "overview", self.overview), ("/rollouts", "rollouts", self.rollouts),
                 ("/rollout", "rollout", self.rollout), ("/trace", "trace", self.trace),
                 ("/span", "span", self.span),
                 ("/resources", "resources", self.resources),
                 ("/runners", "runners", self.runners)]
        out = []
        for path, name, read in table:
            for fragment in (False, True):
                url = f"/fragment/{name}" if fragment else path

                def endpoint(request: Request, name: str = name, read: Any = read,
                             fragment: bool = fragment) -> Response:
                    return self.render(request, name, fragment, read)
                out.append(Route(url, endpoint, methods=["GET"],
                                 name=f"{name}{'-fragment' if fragment else ''}"))
        return out

    # ---------------------------------------------------------------- pages
    def overview(self, request: Request) -> dict[str, Any]:
        stats = self.source.statistics()
        rates = self.history.rates()
        return {"stats": stats, "by_status": stats.get("rollouts_by_status", {}),
                "finished_chart": chart(rates, lambda r: r.finished_per_s),
                "spans_chart": chart(rates, lambda r: r.spans_per_s)}

    def rollouts(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        statuses = [s for s in query.getlist("status") if s]
        unknown = [s for s in statuses if s not in ROLLOUT_STATUSES]
        if unknown:
            raise InvalidArgument(f"unknown status {unknown[0]!r}; one of "
                                  f"{', '.join(ROLLOUT_STATUSES)}")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidArgument("order must be asc or desc")
        limit = _int(request, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
        offset = _int(request, "offset", 0, 0, 10**12)
        contains = query.get("q", "").strip()
        page = self.source.rollouts(statuses=statuses, contains=contains,
                                    newest_first=order == "desc", limit=limit, offset=offset)
        return {"page": page, "chosen": statuses, "q": contains, "order": order,
                "limit": limit}

    def rollout(self, request: Request) -> dict[str, Any]:
        rollout_id = request.query_params.get("id", "")
        if not rollout_id:
            raise InvalidArgument("which rollout? /rollout?id=ROLLOUT_ID")
        rollout, attempts = self.source.rollout(rollout_id)
        return {"rollout_id": rollout_id, "rollout": rollout, "attempts": attempts}

    def trace(self, request: Request) -> dict[str, Any]:
        rollout_id = request.query_params.get("rollout", "")
        attempt_id = request.query_params.get("attempt", "latest") or "latest"
        if not rollout_id:
            raise InvalidArgument("which trace? /trace?rollout=ROLLOUT_ID&attempt=ATTEMPT_ID")
        spans, stored = self.source.spans(rollout_id, attempt_id)
        bars, total = views.waterfall(spans)
        return {"rollout_id": rollout_id, "attempt_id": attempt_id, "spans": spans,
                "stored": stored, "bars": bars, "total": total,
                "span_urls": views.span_urls(spans)}

    def span(self, request: Request) -> dict[str, Any]:
        """One span's attributes, status, events, links and resource: what the trace page's
        <details> load when opened (so a trace page never carries every span's attributes)."""
        query = request.query_params
        rollout_id, attempt_id = query.get("rollout", ""), query.get("attempt", "")
        span_id = query.get("span", "")
        if not (rollout_id and attempt_id and span_id):
            raise InvalidArgument("which span? /span?rollout=ROLLOUT_ID&attempt=ATTEMPT_ID"
                                  "&span=SPAN_ID")
        return {"rollout_id": rollout_id, "attempt_id": attempt_id, "span_id": span_id,
                "span": self.source.span(rollout_id, attempt_id, span_id)}

    def resources(self, request: Request) -> dict[str, Any]:
        wanted = [i.strip() for i in request.query_params.getlist("id") if i.strip()]
        latest, found, stored = self.source.resources(wanted)
        missing = [i for i in wanted if i not in {r.resources_id for r in found}]
        return {"latest": latest, "found": found, "missing": missing, "wanted": wanted,
                "stored": stored}

    def runners(self, request: Request) -> dict[str, Any]:
        runners, stored = self.source.runners()
        return {"runners": runners, "stored": stored}


def create_app(source: Source, history: History | None = None, *,
               allowed_hosts: list[str] | None = None, sample: bool = True) -> Starlette:
    """The ASGI app reading ``source``. ``allowed_hosts``: Host header names it answers to
    (default: loopback names only). ``sample``: run the throughput sampler while serving."""
    history = history or History(source)
    pages = Pages(source, history)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if sample:
            history.start()
        try:
            yield
        finally:
            history.stop()
            source.close()

    routes = [*pages.routes(),
              Mount("/static", StaticFiles(directory=HERE / "static"), name="static")]
    hosts = list(allowed_hosts) if allowed_hosts else list(LOOPBACK_NAMES)
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                                 # a 1,000-span trace is ~1 MB of HTML, ~10x less gzipped
                                 Middleware(GZipMiddleware, minimum_size=4096)])
