"""agent-lightning's pydantic records to mpstore's records and back.

mpstore's records keep agent-lightning's field names, so each conversion is a field copy:
enums become their values, nested records their own models. Records going out are built with
``model_construct`` where mpstore already guarantees what validation would check (rollouts,
attempts, workers: the hot path) and with ``model_validate`` where agent-lightning's nested
models (span contexts, events, resources) need building. Fields a model of the installed
release does not have (0.2.2's ``ResourcesUpdate`` has no times) are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import agentlightning.types as agl_types
from agentlightning import Attempt, AttemptedRollout, ResourcesUpdate, Rollout, RolloutConfig
from agentlightning import Span as AglSpan
from agentlightning.store.base import Unset as AglUnset
from pydantic import BaseModel

from .. import types as mp

__all__ = [
    "PAGES",
    "attempt_out",
    "config_in",
    "enqueue_request_in",
    "page_out",
    "resources_in",
    "resources_out",
    "rollout_out",
    "span_in",
    "span_out",
    "unset_in",
    "worker_out",
]

#: agent-lightning 0.3.0 pages its queries (``PaginatedResult``) and has workers; 0.2.2 not.
PAGES = hasattr(agl_types, "PaginatedResult")
_PaginatedResult: Any = getattr(agl_types, "PaginatedResult", None)
_Worker: Any = getattr(agl_types, "Worker", None)

_ROLLOUT_FIELDS = tuple(mp.Rollout._fields)  # type: ignore[attr-defined]
_ATTEMPT_FIELDS = tuple(mp.Attempt._fields)  # type: ignore[attr-defined]
_SPAN_FIELDS = tuple(mp.Span._fields)  # type: ignore[attr-defined]
_WORKER_FIELDS = tuple(mp.Worker._fields)  # type: ignore[attr-defined]


def _plain(value: Any) -> Any:
    return getattr(value, "_value_", value)


def unset_in(value: Any) -> Any:
    """agent-lightning's ``UNSET`` as mpstore's (they are different singletons)."""
    return mp.UNSET if isinstance(value, AglUnset) else value


def config_in(config: Any) -> Any:
    """A ``RolloutConfig`` (or None, or a dict) as mpstore takes it."""
    if isinstance(config, BaseModel):
        return config.model_dump()
    return config


def enqueue_request_in(request: Any) -> dict[str, Any]:
    """An ``EnqueueRolloutRequest`` (or a dict of its fields) as a dict for mpstore."""
    data = request.model_dump() if isinstance(request, BaseModel) else dict(request)
    if "config" in data:
        data["config"] = config_in(data["config"])
    return data


def resources_in(resources: Mapping[str, Any]) -> Any:
    """Named resources (pydantic LLM / ProxyLLM / PromptTemplate) as dicts of their fields."""
    if not isinstance(resources, Mapping):
        return resources  # mpstore refuses it with a clear message
    return {name: r.model_dump() if isinstance(r, BaseModel) else r
            for name, r in resources.items()}


def span_in(span: Any) -> Any:
    """An agent-lightning ``Span`` as an mpstore ``Span`` (extra fields are not kept)."""
    if not isinstance(span, BaseModel):
        return span  # a dict or an mpstore Span: mpstore checks it
    data = span.model_dump()
    return mp.Span(*(data.get(name) for name in _SPAN_FIELDS))


def _config_out(config: Any) -> RolloutConfig:
    if not isinstance(config, mp.RolloutConfig):
        return RolloutConfig.model_validate(config)
    return RolloutConfig.model_construct(
        timeout_seconds=config.timeout_seconds, unresponsive_seconds=config.unresponsive_seconds,
        max_attempts=config.max_attempts,
        retry_condition=[_plain(s) for s in config.retry_condition])


def attempt_out(attempt: mp.Attempt | None) -> Attempt | None:
    if attempt is None:
        return None
    data = {name: getattr(attempt, name) for name in _ATTEMPT_FIELDS}
    data["status"] = _plain(attempt.status)
    return Attempt.model_construct(**data)


def rollout_out(rollout: mp.Rollout | None) -> Rollout | None:
    """A Rollout, or an AttemptedRollout when mpstore returned one."""
    if rollout is None:
        return None
    data = {name: getattr(rollout, name) for name in _ROLLOUT_FIELDS}
    data["status"], data["mode"] = _plain(rollout.status), _plain(rollout.mode)
    data["config"] = _config_out(rollout.config)
    if isinstance(rollout, mp.AttemptedRollout):
        return AttemptedRollout.model_construct(**data, attempt=attempt_out(rollout.attempt))
    return Rollout.model_construct(**data)


def span_out(span: mp.Span | None) -> AglSpan | None:
    if span is None:
        return None
    return AglSpan.model_validate({name: getattr(span, name) for name in _SPAN_FIELDS})


def _resource_fields(resource: Any) -> Any:
    return dataclasses.asdict(resource) if dataclasses.is_dataclass(resource) else resource


def resources_out(update: mp.ResourcesUpdate | None) -> ResourcesUpdate | None:
    if update is None:
        return None
    data = {"resources_id": update.resources_id, "create_time": update.create_time,
            "update_time": update.update_time, "version": update.version,
            "resources": {name: _resource_fields(r) for name, r in update.resources.items()}}
    fields = ResourcesUpdate.model_fields
    return ResourcesUpdate.model_validate({k: v for k, v in data.items() if k in fields})


def worker_out(worker: mp.Worker | None) -> Any:
    if worker is None or _Worker is None:
        return worker  # 0.2.2 has no Worker model: mpstore's record
    data = {name: getattr(worker, name) for name in _WORKER_FIELDS}
    data["status"] = _plain(worker.status)
    return _Worker.model_construct(**data)


def page_out(page: Sequence[Any], convert: Any) -> Any:
    """A PaginatedResult of the converted items (0.3.0), or a plain list (0.2.2)."""
    items = [convert(item) for item in page]
    if not PAGES:
        return items
    return _PaginatedResult(items=items, limit=getattr(page, "limit", -1),
                            offset=getattr(page, "offset", 0),
                            total=getattr(page, "total", len(items)))
