"""Mutual TLS: a cluster CA, a server certificate and a runner's client certificate, made at
run time; a TLS server that requires the client certificate; a call through it.

    pip install trustme          # only for this demo's throw-away CA (the test extra has it)
    python examples/tls_cluster.py

Nothing here is kept: the CA, the certificates and their keys live in a temporary directory
that is removed at the end. For a real cluster make them once with openssl (README.md,
"A CA and certificates for a cluster") and start the server yourself:

    agl store --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
    # each runner node: connect("trainer-0:4747", authkey=key, tls_ca="ca.pem",
    #                           tls_cert="runner.pem", tls_key="runner.key")
    # or MPSTORE_TLS_CA / MPSTORE_TLS_CERT / MPSTORE_TLS_KEY in the environment
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mpstore import AuthenticationFailed, StoreUnavailable
from mpstore.testing import ServerProcess, start_server


def make_certificates(directory: Path) -> dict[str, str]:
    """The cluster CA, the server's certificate for 127.0.0.1/localhost (what clients connect
    to: the certificate must name it) and one runner's client certificate, as PEM files."""
    import trustme

    ca = trustme.CA()
    files = {name: str(directory / name) for name in (
        "ca.pem", "server.pem", "server.key", "runner.pem", "runner.key")}
    ca.cert_pem.write_to_path(files["ca.pem"])
    for leaf, name in ((ca.issue_cert("127.0.0.1", "localhost"), "server"),
                       (ca.issue_cert("runner-1"), "runner")):
        leaf.cert_chain_pems[0].write_to_path(files[f"{name}.pem"])
        leaf.private_key_pem.write_to_path(files[f"{name}.key"])
    return files


def attempt(server: ServerProcess, **tls: str | None) -> str:
    """Try a call with other TLS settings than the runner's; say how it ended."""
    try:
        with server.connect(retry_for=0, **tls) as store:
            store.ping()
    except (AuthenticationFailed, StoreUnavailable) as exc:
        return f"refused ({type(exc).__name__})"
    return "accepted"


def main() -> int:
    try:
        import trustme  # noqa: F401
    except ImportError:
        print("this demo makes its CA with trustme: pip install trustme", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="mpstore-tls-") as tmp:
        files = make_certificates(Path(tmp))
        server_args = ["--tls-cert", files["server.pem"], "--tls-key", files["server.key"],
                       "--tls-client-ca", files["ca.pem"], "--handshake-timeout", "2"]
        client_tls = {"tls_ca": files["ca.pem"], "tls_cert": files["runner.pem"],
                      "tls_key": files["runner.key"]}
        with start_server(args=server_args, connect_args=client_tls) as server:
            # = mpstore.connect(server.address, server.authkey, **client_tls)
            with server.connect() as store:
                info = store.ping()
                print(f"TLS call: ping -> {info['name']} {info['version']} at {store.address}")
                rollout = store.enqueue_rollout({"question": "What is 6 x 7?"})
                print(f"TLS call: enqueued {rollout.rollout_id} status={rollout.status}")
            # The server checks the client certificate (then the key): without it, no entry.
            print(f"without a client certificate: {attempt(server, tls_cert=None, tls_key=None)}")
            print(f"plaintext: {attempt(server, tls_ca=None, tls_cert=None, tls_key=None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
