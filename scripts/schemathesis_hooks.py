"""Schemathesis hooks for calmkv's API contract run (scripts/schemathesis.sh).

OpenAPI 3.0 cannot say that one parameter excludes another: a `type=lww`
write takes neither `X-Context` nor `If-None-Match` (documented on the `type`
parameter), so schema-valid lww cases drop both.

Nor can it say that a set operation's `add` and `remove` are disjoint (a
member both added and removed is `400 bad_request`, documented on the set
operation): schema-valid set operations drop such members from `remove`.

`X-Context` is an opaque token that only a node issues; a string generated
from the schema's pattern is almost never one, and the server answers it with
`400 bad_request`, as documented. Schema-valid cases therefore send a real
token instead: the context of a key never written (version byte 1, then the
MessagePack map {"vv": {}, "cloud": []}). Cases meant to be invalid keep what
was generated.
"""

import re

import schemathesis

EMPTY_CONTEXT_TOKEN = "AYKidnaApWNsb3VkkA"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def disjoint_set_ops(op):
    """Drops members that a set operation (at any map depth) also adds."""
    if not isinstance(op, dict):
        return
    set_op = op.get("set")
    if isinstance(set_op, dict) and isinstance(set_op.get("add"), list) and isinstance(set_op.get("remove"), list):
        added = set(m for m in set_op["add"] if isinstance(m, str))
        kept = [m for m in set_op["remove"] if not (isinstance(m, str) and m in added)]
        if kept or "add" not in set_op or not set_op["add"]:
            set_op["remove"] = kept
        else:
            del set_op["remove"]
    map_op = op.get("map")
    if isinstance(map_op, dict) and isinstance(map_op.get("update"), dict):
        for nested in map_op["update"].values():
            disjoint_set_ops(nested)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.method.upper() == "POST" and isinstance(case.body, dict):
        disjoint_set_ops(case.body)
    headers = case.headers or {}
    if case.method.upper() == "PUT" and (case.query or {}).get("type") == "lww":
        headers.pop("X-Context", None)
        headers.pop("If-None-Match", None)
    token = headers.get("X-Context")
    if token is not None and TOKEN_PATTERN.match(token) and len(token) <= 65536:
        headers["X-Context"] = EMPTY_CONTEXT_TOKEN
    return None
