"""The curated public API of ``mpstore`` (SPEC §1: explicit imports + sorted ``__all__``)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re

import mpstore
import mpstore.errors
import mpstore.types

#: Everything a user may import from ``mpstore``. A new public name is added here on purpose.
EXPECTED = {
    "LLM",
    "UNSET",
    "Attempt",
    "AttemptNotFound",
    "AttemptStatus",
    "AttemptedRollout",
    "AuthenticationFailed",
    "FinishedRollouts",
    "InMemoryStore",
    "InvalidArgument",
    "MpstoreError",
    "NoAttempts",
    "Page",
    "PromptTemplate",
    "ProxyLLM",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "RolloutMode",
    "RolloutNotFound",
    "RolloutStatus",
    "ServerStartError",
    "Span",
    "SpansEvicted",
    "StorageError",
    "StoreError",
    "StoreUnavailable",
    "Unset",
    "VersionMismatch",
    "Worker",
    "WorkerStatus",
    "__version__",
}
#: Names the transport (mpstore.manager, issue 3) adds: connect() and the type it returns.
TRANSPORT = {"StoreClient", "connect"}
#: Helpers of mpstore.types that are deliberately not re-exported.
TYPES_INTERNAL = {"new_attempt_id", "new_resources_id", "new_rollout_id", "private_copy"}


def transport_built() -> bool:
    try:
        client = importlib.util.find_spec("mpstore.manager.client")
    except ModuleNotFoundError:
        return False
    return client is not None


def isort_key(name: str) -> tuple[int, list[object]]:
    """The order ruff's RUF022 (enabled in pyproject.toml) enforces: SCREAMING_CASE, then
    CamelCase, then the rest; a natural sort within each group."""
    group = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return group, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def test_all_is_sorted_and_unique() -> None:
    assert mpstore.__all__ == sorted(mpstore.__all__, key=isort_key)
    assert isort_key("LLM") < isort_key("Attempt") < isort_key("__version__")
    assert len(set(mpstore.__all__)) == len(mpstore.__all__)


def test_every_name_exists() -> None:
    for name in mpstore.__all__:
        assert hasattr(mpstore, name), name


def test_expected_names() -> None:
    names = set(mpstore.__all__)
    assert EXPECTED <= names, f"missing: {sorted(EXPECTED - names)}"
    assert names <= EXPECTED | TRANSPORT, f"unexpected: {sorted(names - EXPECTED - TRANSPORT)}"
    if transport_built():
        assert TRANSPORT <= names, "connect/StoreClient must be public once the transport exists"
        assert callable(mpstore.connect)  # type: ignore[attr-defined]


def test_nothing_public_is_missing() -> None:
    # Every exception and every public type is reachable from the package itself.
    assert set(mpstore.errors.__all__) <= set(mpstore.__all__)
    assert set(mpstore.types.__all__) - TYPES_INTERNAL <= set(mpstore.__all__)
    for name in set(mpstore.errors.__all__) | (set(mpstore.types.__all__) - TYPES_INTERNAL):
        module = mpstore.errors if name in mpstore.errors.__all__ else mpstore.types
        assert getattr(mpstore, name) is getattr(module, name), name


def test_star_import() -> None:
    scope: dict[str, object] = {}
    exec("from mpstore import *", scope)
    assert set(mpstore.__all__) <= set(scope)


def test_version() -> None:
    assert isinstance(mpstore.__version__, str)
    assert mpstore.__version__.count(".") >= 1


def test_submodules_declare_all() -> None:
    # mpstore.agentlightning needs the extra; its own tests (tests/agentlightning) check it
    # in the environments that have agentlightning.
    adapter = importlib.util.find_spec("agentlightning") is None
    names = [info.name for info in pkgutil.walk_packages(mpstore.__path__, "mpstore.")
             if info.name != "mpstore.__main__"  # a script, not a module to import
             and not (adapter and info.name.startswith("mpstore.agentlightning"))]
    assert {"mpstore.api", "mpstore.store", "mpstore.manager.client"} <= set(names)
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional extra's library (mpstore[dashboard])
            if exc.name is None or exc.name.split(".")[0] == "mpstore":
                raise
            continue
        assert hasattr(module, "__all__"), name
        assert module.__all__ == sorted(module.__all__, key=isort_key), name
        for item in module.__all__:
            assert hasattr(module, item), f"{name}.{item}"
