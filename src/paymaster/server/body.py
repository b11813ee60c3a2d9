"""Reading request bodies strictly: a size bound, JSON objects only, no unknown fields.

Everything here raises ``invalid_request`` (422, or 413 for a body over the bound) or
``invalid_amount`` for money that is not a decimal string, so bad input never reaches the
authority, and nothing is written for it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from starlette.requests import Request

from paymaster.core.budgets import check_id
from paymaster.errors import InvalidRequest
from paymaster.money import parse_nanos

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any real API request, small enough to refuse cheaply
MAX_TEXT = 1024
# Far deeper than any real request; bounded so that no later json.dumps (the body hash, the
# store) can hit the interpreter's recursion limit on something the parser accepted.
MAX_DEPTH = 64
_COUNT_MAX = 10**12  # token and unit counts: generous, but bounded like money
_DECIMAL_RE = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
# I-JSON (RFC 7493): what every JSON parser reads the same way, and what the audit chain's
# canonical JSON (RFC 8785) can represent: integers within +-(2**53 - 1), finite numbers,
# no unpaired surrogates.
_SAFE_INTEGER = 2**53 - 1
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def too_large() -> InvalidRequest:
    return InvalidRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413)


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 as soon as it passes :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With duplicate names, parsers disagree on which one wins; the body hash and the
    # decision must see the same request, so the ambiguity is refused.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate field name")
    return obj


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _safe_int(text: str) -> int:
    value = int(text)
    if abs(value) > _SAFE_INTEGER:
        raise ValueError(f"the integer {text[:20]} is outside +-(2**53 - 1)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def parse_object(raw: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """Parse a JSON object body (I-JSON, at most :data:`MAX_DEPTH` deep). An empty body is
    ``{}`` where ``allow_empty``."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise InvalidRequest("a JSON object body is required")
    try:
        obj = json.loads(
            raw,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_safe_int,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON, bad UTF-8 and the I-JSON refusals above.
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {_kind(obj)}")
    _check_tree(obj)
    return obj


def _check_tree(root: dict[str, Any]) -> None:
    """Nesting depth and unpaired surrogates, without recursion."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the body is nested deeper than {MAX_DEPTH} levels")
        items = [*node, *node.values()] if isinstance(node, dict) else node
        for item in items:
            if isinstance(item, str):
                if _SURROGATE_RE.search(item):
                    raise InvalidRequest("the body holds an unpaired UTF-16 surrogate (not I-JSON)")
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_fields(body: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Refuse unknown fields and missing (or null) required ones."""
    allowed_set = set(allowed)
    unknown = sorted(set(body) - allowed_set)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed_set))}"
        )
    missing = [name for name in required if body.get(name) is None]
    if missing:
        raise InvalidRequest(f"missing required field(s) {', '.join(missing)}")


# Field readers. A null optional field is read as absent.


def text(body: Mapping[str, Any], name: str, *, max_len: int = MAX_TEXT) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequest(f"{name} must be a non-empty string of at most {max_len} characters")
    return value


def ident(body: Mapping[str, Any], name: str) -> str | None:
    """An id that may end up inside a budget id: no '/', no spaces or controls."""
    value = body.get(name)
    return None if value is None else check_id(value, name)


def integer(body: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return value


def obj(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object")
    return value


def money(body: Mapping[str, Any], name: str, *, allow_zero: bool = True) -> int | None:
    """A decimal-string amount in nanos; a JSON number is ``invalid_amount``."""
    value = body.get(name)
    return None if value is None else parse_nanos(value, field=name, allow_zero=allow_zero)


_ESTIMATE_FIELDS = {
    "model": "text",
    "input_tokens": "count",
    "input_text_bytes": "count",
    "max_output_tokens": "count",
    "units": "units",
    "unit": "text",
}
_USAGE_FIELDS = {
    "model": "text",
    "input_tokens": "count",
    "output_tokens": "count",
    "cached_input_tokens": "count",
    "units": "units",
    "unit": "text",
}


def usage_object(body: Mapping[str, Any], name: str, *, actual: bool) -> dict[str, Any] | None:
    """``usage_estimate`` (reserve) or ``usage`` (commit): an LLM shape
    ``{model, input_tokens | input_text_bytes, max_output_tokens | output_tokens}`` or a
    unit shape ``{units, unit}``. Counts are integers; ``units`` an integer or a decimal string."""
    value = obj(body, name)
    if value is None:
        return None
    fields = _USAGE_FIELDS if actual else _ESTIMATE_FIELDS
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise InvalidRequest(f"{name}: unknown field(s) {', '.join(unknown)}")
    for key, kind in fields.items():
        item = value.get(key)
        if item is None:
            continue
        if kind == "text":
            text(value, key, max_len=256)
        elif kind == "count":
            integer(value, key, low=0, high=_COUNT_MAX)
        elif not (
            (isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= _COUNT_MAX)
            or (isinstance(item, str) and _DECIMAL_RE.fullmatch(item))
        ):
            raise InvalidRequest(f"{name}.units must be a non-negative integer or decimal string")
    if "units" not in value and "model" not in value:
        raise InvalidRequest(f"{name} needs units (with unit) or a model")
    return value
