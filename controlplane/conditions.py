"""Status conditions as the API server wants them: type, status, reason, message and
lastTransitionTime, the time kept while the status stays the same.

Conditions are a map keyed by type (the ServiceExport CRD: x-kubernetes-list-type: map).
Of a ServiceExport's we own only the types reconcile.py writes; any other type is another
controller's (a policy engine, a GitOps tool): kept as it stands, where it stands, when we
write ours, and never a difference to us (neither drift nor a reason to write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Conditions = Mapping[str, Mapping[str, Any]]  # by type

# What reconcile.py's _export_obj writes; docs: mcs-spec.md, 5.
EXPORT_CONDITION_TYPES = frozenset({"Valid", "Ready", "Conflict"})


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


def own_export_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The conditions of our types in `obj` (a ServiceExport, or just its status under
    "status"), by type: what a write or a drift check compares, in any order."""
    return {t: c for t, c in conditions_by_type(obj).items() if t in EXPORT_CONDITION_TYPES}


def with_own_conditions(live: Sequence[Any], ours: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The conditions to write: `live` (as the object holds them) with ours in place of
    those of our types. Every other entry is kept as it is and where it is; ours take the
    place of their type, a type new to the list goes at the end."""
    wanted = {str(c["type"]): c for c in ours}
    merged: list[Any] = []
    for found in live:
        type_ = found.get("type") if isinstance(found, Mapping) else None
        if type_ not in EXPORT_CONDITION_TYPES:
            merged.append(found)
        elif type_ in wanted:  # a second entry of one type (invalid) is dropped
            merged.append(wanted.pop(type_))
    merged.extend(wanted.values())
    return merged
