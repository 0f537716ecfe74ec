"""TLS certificates made at test time (trustme): a cluster CA, the server's certificate for
127.0.0.1/localhost, a client certificate, an expired server certificate and an unrelated CA.
Nothing is committed: every session makes its own keys."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

__all__ = ["TLSFiles", "make_tls_files"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: ``ca`` signed ``cert``/``key`` (the server), ``client_cert``/``client_key``
    and ``expired_cert``/``expired_key``; ``other_ca`` signed nothing here."""

    ca: str
    cert: str
    key: str
    client_cert: str
    client_key: str
    expired_cert: str
    expired_key: str
    other_ca: str

    def server_args(self, *, client_ca: bool = False, expired: bool = False) -> list[str]:
        """``agl store`` options for a TLS server with these files."""
        cert, key = (self.expired_cert, self.expired_key) if expired else (self.cert, self.key)
        return ["--tls-cert", cert, "--tls-key", key,
                *(["--tls-client-ca", self.ca] if client_ca else [])]

    def client_args(self, *, client_cert: bool = False) -> dict[str, Any]:
        """``connect()`` arguments that verify the server (and show the client's cert)."""
        extra = {"tls_cert": self.client_cert, "tls_key": self.client_key} if client_cert else {}
        return {"tls_ca": self.ca, **extra}


def _write(leaf: Any, directory: Path, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def make_tls_files(directory: Path) -> TLSFiles:
    """Generate the certificates into ``directory``."""
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    cert, key = _write(ca.issue_cert("127.0.0.1", "localhost"), directory, "server")
    client_cert, client_key = _write(ca.issue_cert("runner-1"), directory, "client")
    expired_cert, expired_key = _write(
        ca.issue_cert("127.0.0.1", "localhost", not_before=past - datetime.timedelta(days=30),
                      not_after=past), directory, "expired")
    return TLSFiles(str(directory / "ca.pem"), cert, key, client_cert, client_key,
                    expired_cert, expired_key, str(directory / "other-ca.pem"))
