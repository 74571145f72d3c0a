"""Each typed error's status code: declared once on its class, the same on the server and the client."""

from __future__ import annotations

import inspect

import grpc
import pytest

from adapters import errors
from server.api.errors import status_for
from server.client.errors import ERROR_BY_STATUS, ServerError, from_status

DEFINED = [
    kind
    for kind in vars(errors).values()
    if inspect.isclass(kind) and issubclass(kind, errors.LoraloomError) and kind.__module__ == errors.__name__
]


def _general(kind: type[errors.LoraloomError]) -> type[errors.LoraloomError]:
    """The direct subclass of LoraloomError that ``kind`` is (or descends from)."""
    return next(base for base in kind.__mro__ if errors.LoraloomError in base.__bases__)


@pytest.mark.parametrize("kind", DEFINED, ids=lambda kind: kind.__name__)
def test_every_error_names_a_status_code(kind):
    assert kind.code in grpc.StatusCode.__members__


def test_subclasses_inherit_their_parents_code():
    assert errors.AdapterInvalid.code == errors.InvalidArgument.code == "INVALID_ARGUMENT"
    assert errors.AdapterIncompatible.code == errors.FailedPrecondition.code == "FAILED_PRECONDITION"
    assert errors.LoraloomError.code == "INTERNAL" and errors.DataLoss.code == "DATA_LOSS"


def test_general_classes_have_distinct_codes():
    general = [kind for kind in DEFINED if kind is not errors.LoraloomError and _general(kind) is kind]
    assert len({kind.code for kind in general}) == len(general)
    assert set(ERROR_BY_STATUS.values()) == set(general)


@pytest.mark.parametrize(
    "kind", [kind for kind in DEFINED if kind is not errors.LoraloomError], ids=lambda kind: kind.__name__
)
def test_round_trip(kind):
    """server status_for -> the wire -> client from_status gives the same general class and message."""
    error = kind("full", 2.5) if issubclass(kind, errors.ResourceExhausted) else kind("what to do")
    code, message, trailers = status_for(error)
    assert code is grpc.StatusCode[kind.code]
    back = from_status(code, message, trailers)
    assert type(back) is _general(kind)
    assert str(back) == str(error)
    if isinstance(error, errors.ResourceExhausted):
        assert back.retry_after_s == 2.5


def test_internal_errors_keep_their_message_to_the_log():
    for error in (errors.LoraloomError("secret"), KeyError("secret")):
        code, message, trailers = status_for(error)
        assert code is grpc.StatusCode.INTERNAL and "secret" not in message and "incident" in message
        back = from_status(code, message, trailers)
        assert type(back) is ServerError and back.code is grpc.StatusCode.INTERNAL


def test_out_of_range_is_an_invalid_argument():
    assert type(from_status(grpc.StatusCode.OUT_OF_RANGE, "too far")) is errors.InvalidArgument
