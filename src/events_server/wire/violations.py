"""Field violations, and how they travel: a google.rpc BadRequest in the status details.

The server packs them into an INVALID_ARGUMENT; the Python client and the REST bridge
unpack them, so all three read one format (what grpc-status's ``rpc_status`` does,
without needing grpcio here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.rpc import code_pb2, error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""The trailing metadata that carries the whole google.rpc.Status, serialized."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field: ``field`` is a path such as ``events[3].tenant``."""

    field: str
    description: str
    reason: str


def pack_invalid_argument(message: str, violations: Iterable[FieldViolation]) -> bytes:
    """The serialized google.rpc.Status of an INVALID_ARGUMENT naming ``violations``."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=v.field, description=v.description, reason=v.reason
            )
            for v in violations
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(bad_request)
    serialized: bytes = status.SerializeToString()
    return serialized


def unpack_violations(
    trailing_metadata: Sequence[tuple[str, str | bytes]] | None,
) -> list[FieldViolation]:
    """The violations a call's trailing metadata carries (none when it carries no BadRequest)."""
    found: list[FieldViolation] = []
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                found.extend(
                    FieldViolation(v.field, v.description, v.reason)
                    for v in bad_request.field_violations
                )
    return found
