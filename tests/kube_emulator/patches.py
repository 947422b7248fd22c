"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902) over plain JSON values."""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """The patch cannot be applied; the API server answers 422 Invalid."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _locate(doc: Any, path: str, *, adding: bool = False) -> tuple[Any, Any]:
    """The container holding `path` and the key or index of its last token."""
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer: {path!r}")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        if isinstance(doc, list):
            if last and adding and token == "-":
                return doc, len(doc)
            limit = len(doc) + (1 if last and adding else 0)
            if not token.isdigit() or int(token) >= limit:
                raise PatchError(f"array index out of range in {path}")
            key: Any = int(token)
        elif isinstance(doc, dict) and (token in doc or (last and adding)):
            key = token
        else:
            raise PatchError(f"path not found: {path}")
        if last:
            return doc, key
        doc = doc[key]
    raise PatchError(f"invalid JSON pointer: {path!r}")


def _add(doc: Any, path: str, value: Any) -> Any:
    if path == "":
        return value
    parent, key = _locate(doc, path, adding=True)
    if isinstance(parent, list):
        parent.insert(key, value)
    else:
        parent[key] = value
    return doc


def _remove(doc: Any, path: str) -> Any:
    parent, key = _locate(doc, path)
    return parent.pop(key)


def _get(doc: Any, path: str) -> Any:
    if path == "":
        return doc
    parent, key = _locate(doc, path)
    return parent[key]


def json_patch(target: Any, ops: list[Any]) -> Any:
    """RFC 6902 add/remove/replace/move/copy/test, all or nothing (on a copy)."""
    doc = copy.deepcopy(target)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "replace":
            _get(doc, path)  # must exist
            if path == "":
                doc = copy.deepcopy(op["value"])
            else:
                parent, key = _locate(doc, path)
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "move":
            doc = _add(doc, path, _remove(doc, op["from"]))
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"testing value {path} failed")
        else:
            raise PatchError(f"unknown JSON patch operation: {kind!r}")
    return doc
