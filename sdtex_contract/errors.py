"""Error codes and the one exception type of the protocol: a code, a message for people, data for programs."""

from __future__ import annotations

from typing import Any

# Error codes.
PARSE_ERROR = "parse_error"  # the line is not a JSON object (or too long)
INVALID_REQUEST = "invalid_request"  # missing/ill-typed id, method or params
METHOD_NOT_FOUND = "method_not_found"
INVALID_PARAMS = "invalid_params"  # a parameter is out of range; message names it and what is accepted
PROTOCOL_MISMATCH = "protocol_mismatch"
MODEL_NOT_FOUND = "model_not_found"
UNSAFE_CHECKPOINT = "unsafe_checkpoint"  # pickle checkpoint without allow_pickle
MODEL_LOAD_FAILED = "model_load_failed"
OUT_OF_MEMORY = "out_of_memory"
OUTPUT_FAILED = "output_failed"  # output_dir not writable, disk full; message names the folder
NOT_FOUND = "not_found"  # unknown job id or artifact
SHUTTING_DOWN = "shutting_down"  # a request sent after shutdown (or after the input ended)
INTERNAL_ERROR = "internal_error"  # data.traceback holds the worker's traceback
DOWNLOAD_FAILED = "download_failed"  # the hub is unreachable or refuses, or the repository cannot be used
NOT_ENOUGH_SPACE = "not_enough_space"  # message names the folder, the space needed and the space free


class ProtocolError(Exception):
    """An error with a protocol code; the worker turns it into an error reply."""

    def __init__(self, code: str, message: str, data: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message, "data": self.data}


def shown(value: Any, limit: int = 80) -> str:
    """A short, always-encodable rendering of a value for messages (never the value itself: a bad value
    may be 10 MB long, NaN or a lone surrogate)."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(name: str, accepted: str, value: Any) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS,
        f"{name} must be {accepted}, got {shown(value)}",
        {"param": name, "accepted": accepted, "value": shown(value)},
    )
