"""Status conditions as the API server wants them: type, status, reason, message and
lastTransitionTime, the time kept while the status stays the same."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Conditions = Mapping[str, Mapping[str, Any]]  # by type


def condition(
    type_: str, status: bool, reason: str, message: str, previous: Conditions, now: str
) -> dict[str, str]:
    status_text = "True" if status else "False"
    before = previous.get(type_)
    moved_at = now
    if before is not None and before.get("status") == status_text:
        moved_at = str(before.get("lastTransitionTime") or now)
    return {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": moved_at,
    }


def conditions_by_type(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    status = obj.get("status")
    raw: Sequence[Any] = status.get("conditions") or [] if isinstance(status, Mapping) else []
    if not isinstance(raw, list):
        return {}
    return {c["type"]: c for c in raw if isinstance(c, Mapping) and isinstance(c.get("type"), str)}
