"""Translation between the contract's JSON form of an event and the protobuf types.

Protobuf messages are built by direct construction: ``json_format`` is several
times slower and knows nothing of the contract's lower-case type names.

"No value" is one state: JSON ``null`` and an absent field both become an unset
proto3 ``optional`` (and an empty ``variant_ids`` / ``entity_identifiers``), and
come back out as an absent field. ``""`` is a value and stays ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from events_server.pb import events_pb2 as pb
from events_server.wire.tracked import EVENT, envelope_kind, kind_to_dict
from events_server.wire.violations import FieldViolation

TYPE_NAMES: dict[int, str] = {
    pb.EVENT_TYPE_PAGE_VIEW: "page_view",
    pb.EVENT_TYPE_CLICK: "click",
    pb.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    pb.EVENT_TYPE_PURCHASE: "purchase",
    pb.EVENT_TYPE_ELEMENT_VISIBLE: "element_visible",
    pb.EVENT_TYPE_WS_CLICK: "ws_click",
    pb.EVENT_TYPE_RECOMMENDATIONS_INSERTED: "recommendations_inserted",
}
"""Contract name of every valid EventType (UNSPECIFIED is deliberately absent)."""

TYPE_VALUES: dict[str, pb.EventType.ValueType] = {
    name: pb.EventType.ValueType(number) for number, name in TYPE_NAMES.items()
}

ENVELOPE_EVENT_FIELD = pb.Envelope.DESCRIPTOR.fields_by_name["event"].number

OPTIONAL_STRING_FIELDS: tuple[str, ...] = tuple(
    f.name
    for f in pb.Event.DESCRIPTOR.fields
    if f.has_presence and f.type == f.TYPE_STRING and f.name not in ("tenant", "market")
)
"""The contract's nullable string fields, in proto field order."""


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(value: int) -> bytes:
    """Protobuf base-128 varint encoding of a non-negative integer."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string, bytes or sub-message)."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def envelope_bytes(event: bytes, context: bytes, field: int = ENVELOPE_EVENT_FIELD) -> bytes:
    """A serialized Envelope from a serialized Event (or, in ``field``, a v2 kind's message:
    see ``tracked.ENVELOPE_FIELDS``) and the serialized rest of the Envelope.

    Protobuf parses fields in any order, so the request's shared context is
    serialized once and each event is prefixed to it: no per-event copies.
    """
    tag = _EVENT_TAG if field == ENVELOPE_EVENT_FIELD else varint(field << 3 | 2)
    return b"".join((tag, _length(len(event)), event, context))


_EVENT_TAG = varint(ENVELOPE_EVENT_FIELD << 3 | 2)


def _length(n: int) -> bytes:
    """``varint(n)``, without its loop for the lengths of nearly every string and event."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    return varint(n)


_CONTEXT_FIELDS = {
    name: varint(pb.Envelope.DESCRIPTOR.fields_by_name[name].number << 3 | 2)
    for name in (
        "received_at",
        "client_ip",
        "user_agent",
        "referer",
        "forwarded_host",
        "api_key_id",
        "storefront_origin",
        "ws_message_id",
    )
}
(
    _RECEIVED_AT,
    _CLIENT_IP,
    _USER_AGENT,
    _REFERER,
    _FORWARDED_HOST,
    _API_KEY_ID,
    _STOREFRONT_ORIGIN,
    _WS_MESSAGE_ID,
) = _CONTEXT_FIELDS.values()


def envelope_context(  # noqa: PLR0917
    received_at: bytes,
    client_ip: str,
    user_agent: str | None,
    referer: str | None,
    forwarded_host: str | None,
    api_key_id: str,
    storefront_origin: str | None,
    ws_message_id: str | None,
) -> bytes:
    """The serialized rest of an Envelope (all but its event), as
    ``pb.Envelope(...).SerializeToString()`` gives it, from ``received_at`` (a serialized
    Timestamp) and the strings (None: an optional field not set; "" in a plain field: left
    out, as proto3 does), without building the message: it is built for every request."""
    out = _RECEIVED_AT + _ONE_BYTE[len(received_at)] + received_at  # a Timestamp: < 128
    if client_ip:
        out += _string(_CLIENT_IP, client_ip)
    if user_agent is not None:
        out += _string(_USER_AGENT, user_agent)
    if referer is not None:
        out += _string(_REFERER, referer)
    if forwarded_host is not None:
        out += _string(_FORWARDED_HOST, forwarded_host)
    if api_key_id:
        out += _string(_API_KEY_ID, api_key_id)
    if storefront_origin is not None:
        out += _string(_STOREFRONT_ORIGIN, storefront_origin)
    if ws_message_id is not None:
        out += _string(_WS_MESSAGE_ID, ws_message_id)
    return out


def _string(tag: bytes, value: str) -> bytes:
    data = value.encode()
    return tag + _length(len(data)) + data


def event_from_dict(data: Mapping[str, Any]) -> pb.Event:
    """Build an Event from an already-validated contract dict (None = no value)."""
    event = pb.Event(tenant=data["tenant"], market=data["market"], type=TYPE_VALUES[data["type"]])
    for name in OPTIONAL_STRING_FIELDS:
        value = data.get(name)
        if value is not None:
            setattr(event, name, value)
    if variant_ids := data.get("variant_ids"):
        event.variant_ids.extend(variant_ids)
    if entity_identifiers := data.get("entity_identifiers"):
        event.entity_identifiers.update(entity_identifiers)
    return event


def event_to_dict(event: pb.Event) -> dict[str, Any]:
    """The contract's JSON form of an Event: fields with no value are left out."""
    out: dict[str, Any] = {
        "tenant": event.tenant,
        "market": event.market,
        "type": TYPE_NAMES.get(event.type, event.type),
    }
    for name in OPTIONAL_STRING_FIELDS:
        if event.HasField(name):  # type: ignore[arg-type]
            out[name] = getattr(event, name)
    if event.variant_ids:
        out["variant_ids"] = list(event.variant_ids)
    if event.entity_identifiers:
        out["entity_identifiers"] = dict(event.entity_identifiers)
    return out


def envelope_to_dict(envelope: pb.Envelope) -> dict[str, Any]:
    """JSON form of a queued envelope, for people and for JSONL sinks: the context, and what
    it holds under the name of its kind (``event``, or a v2 kind: see ``tracked``)."""
    received = envelope.received_at.ToDatetime(tzinfo=UTC)
    out: dict[str, Any] = {
        "received_at": received.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "client_ip": envelope.client_ip,
    }
    for name in ("user_agent", "referer", "forwarded_host"):
        if envelope.HasField(name):
            out[name] = getattr(envelope, name)
    out["api_key_id"] = envelope.api_key_id
    if envelope.HasField("storefront_origin"):
        out["storefront_origin"] = envelope.storefront_origin
    if envelope.HasField("ws_message_id"):
        out["ws_message_id"] = envelope.ws_message_id
    kind = envelope_kind(envelope)
    if kind == EVENT:
        out[EVENT] = event_to_dict(envelope.event)
    else:
        out[kind] = kind_to_dict(getattr(envelope, kind))
    return out


_DICT_STRING_FIELDS = frozenset({"tenant", "market", *OPTIONAL_STRING_FIELDS})
_DICT_REQUIRED = ("tenant", "market", "type")


def fill_event(event: pb.Event, path: str, data: Any) -> list[FieldViolation]:
    """Set ``event`` from an unchecked contract dict; what is wrong with it (``path`` names it).

    Where anything is wrong the message is left half set: use it only when the list is empty.
    """
    if not isinstance(data, Mapping):
        got = type(data).__name__
        return [FieldViolation(path, f"an event is a pb.Event or a dict, not {got}", "type")]
    found: list[FieldViolation] = []

    def bad(name: str, description: str, reason: str) -> None:
        found.append(FieldViolation(f"{path}.{name}", description, reason))

    for name, value in data.items():
        if value is None:
            continue  # the contract's null: no value
        try:
            if name == "type":
                number = TYPE_VALUES.get(value) if isinstance(value, str) else None
                if isinstance(value, int) and not isinstance(value, bool) and value in TYPE_NAMES:
                    number = pb.EventType.ValueType(value)
                if number is None:
                    bad(name, f"unknown event type {value!r}", "enum")
                else:
                    event.type = number
            elif name in _DICT_STRING_FIELDS:
                if isinstance(value, str):
                    setattr(event, name, value)
                else:
                    bad(name, f"must be a string, not {type(value).__name__}", "string_type")
            elif name == "variant_ids":
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    event.variant_ids.extend(value)
                else:
                    bad(name, "must be a list of strings", "list_type")
            elif name == "entity_identifiers":
                if isinstance(value, Mapping) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    event.entity_identifiers.update(value)
                else:
                    bad(name, "must map strings to strings", "dict_type")
            else:
                bad(name, "not a field of Event", "extra_forbidden")
        except ValueError:  # protobuf refuses strings that are not valid UTF-8 (lone surrogates)
            bad(name, "must be valid UTF-8 (no lone surrogates)", "string_unicode")
    for name in _DICT_REQUIRED:
        if data.get(name) is None:
            bad(name, "required", "missing")
    return found
