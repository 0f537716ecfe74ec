"""The ``tls`` scenario: what TLS costs. Two servers at once, one plaintext and one with
``--tls-cert`` (certificates made for the run with trustme, in the scratch directory): the
unbatched cycle at K=``tls_k`` on each, alternating window by window so both see the same
load, and the median time from a new connection to the first answered call on each."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import workload
from .common import HOST, free_port, median, ratio, write_keyfile
from .scenarios import TASK_TIMEOUT, Bench, summarize, throughput
from .servers import Server, _port_open, store_help, store_server

__all__ = ["run_tls", "tls_server"]


def _certificates(bench: Bench) -> dict[str, str]:
    import trustme

    folder = bench.workdir / "tls"
    folder.mkdir(exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}


def tls_server(bench: Bench, files: dict[str, str]) -> Server:
    """``python -m mpstore store --tls-cert ... --tls-key ...`` (not started yet); its
    target carries ``tls_ca`` for the clients."""
    port = free_port()
    keyfile, key = write_keyfile(bench.workdir, "tls-store.key")
    argv = [sys.executable, "-m", "mpstore", "store", "--host", HOST, "--port", str(port),
            "--authkey-file", str(keyfile), "--log-level", "warning",
            "--tls-cert", files["cert"], "--tls-key", files["key"]]
    address = f"{HOST}:{port}"
    target = {"kind": "store", "address": address, "authkey": key, "tls_ca": files["ca"]}

    def ready() -> Any:
        _port_open(port)
        from mpstore import connect

        with connect(address, authkey=key, tls_ca=files["ca"]) as client:
            return client.ping()

    return Server("tls-store", argv, bench.workdir / "tls-store.log", ready, target)


def _first_call_ms(bench: Bench, server: Server) -> float:
    samples = bench.pool.run(workload.first_call, [
        {"target": server.target, "samples": bench.cfg.first_call_samples}], TASK_TIMEOUT)[0]
    return median(samples) * 1e3


def run_tls(bench: Bench) -> None:
    """See the module docstring; skipped if trustme or ``--tls-cert`` is missing."""
    cfg = bench.cfg
    try:
        import trustme  # noqa: F401
    except ImportError:
        bench.results["tls"] = {"skipped": "trustme is not installed (pip install trustme)"}
        return
    if "--tls-cert" not in store_help():
        bench.results["tls"] = {"skipped": "agl store has no --tls-cert"}
        return
    files = _certificates(bench)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(bench.server(store_server(bench.workdir, "plain-store")))
        secure = stack.enter_context(bench.server(tls_server(bench, files)))
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
        for rep in range(cfg.repeats):
            for name, server in (("plain", plain), ("tls", secure)):
                run = throughput(bench, server, "cycle", cfg.tls_k)
                runs[name].append(run)
                bench.log(f"rep {rep + 1}/{cfg.repeats} tls K={cfg.tls_k} {name}: "
                          f"{run['ops_per_s']:,.0f} cycles/s, server {run['server_cpu']:.0%}")
        first = {"plain": _first_call_ms(bench, plain), "tls": _first_call_ms(bench, secure)}
    figures = {name: summarize(r) for name, r in runs.items()}
    bench.results["tls"] = {
        "k": cfg.tls_k, **figures,
        "ratio_tls_to_plain": ratio(figures["tls"]["ops_per_s"],
                                    figures["plain"]["ops_per_s"]),
        "first_call_ms": first,
    }
