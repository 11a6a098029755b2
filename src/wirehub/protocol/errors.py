"""Error codes, close codes and the exception tree.

::

    WirehubError                 a request failed; answered with an ``error`` message
    ├── InvalidMessage           ``invalid_message``: not a JSON object / malformed TLV
    ├── UnknownType              ``unknown_type``: missing or unregistered ``type``
    ├── InvalidField             ``invalid_field``: wrong field type/value, names the field
    ├── InvalidChannel           ``invalid_channel``
    ├── Unavailable              ``unavailable``: the shared broker cannot be reached or refused (temporary)
    ├── EngineUnavailable        ``engine_unavailable``: a source's engine cannot be reached (temporary)
    ├── EngineForbidden          ``engine_forbidden``: the engine (or its socket) refused the gateway
    ├── EngineError              ``engine_error``: the engine answered with another error
    ├── ContainerNotFound        ``container_not_found``
    ├── TooManySubscriptions     ``too_many_subscriptions``
    ├── NotSubscribed            ``not_subscribed``
    ├── RateLimited              ``rate_limited``: not processed, try again later
    ├── Forbidden                ``forbidden``: the token's claims do not allow it
    ├── NotAuthenticated         ``not_authenticated``: only ``auth`` is accepted yet
    ├── Rejected                 ``rejected``: an application middleware said no
    └── FileError                a file transfer failed (``FileCode``), with its ``file_id`` and chunk ``index``

    AuthError                    a token was refused: 401 before the upgrade,
                                 ``auth_error`` then close 1008 after it

Protocol violations at the WebSocket level are not exceptions here: the
receive path closes the connection with a ``CloseCode``
(``wirehub._ext.listener``).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode:
    """The ``code`` values of ``error`` messages (docs/protocol.md)."""

    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    INVALID_CHANNEL = "invalid_channel"
    UNAVAILABLE = "unavailable"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ENGINE_FORBIDDEN = "engine_forbidden"
    ENGINE_ERROR = "engine_error"
    CONTAINER_NOT_FOUND = "container_not_found"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    NOT_SUBSCRIBED = "not_subscribed"
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"
    FORBIDDEN = "forbidden"
    NOT_AUTHENTICATED = "not_authenticated"
    INTERNAL_ERROR = "internal_error"


class FileCode:
    """The ``code`` values of a file transfer's ``error`` messages (docs/protocol.md, "File transfer")."""

    FILES_DISABLED = "files_disabled"
    INVALID_NAME = "invalid_name"
    FILE_TOO_LARGE = "file_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    FILE_CONFLICT = "file_conflict"
    UNKNOWN_FILE = "unknown_file"
    INVALID_CHUNK = "invalid_chunk"
    CHUNK_OUT_OF_RANGE = "chunk_out_of_range"
    DUPLICATE_CHUNK = "duplicate_chunk"
    INCOMPLETE_FILE = "incomplete_file"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    STORAGE_ERROR = "storage_error"


class CloseCode(IntEnum):
    """RFC 6455 §7.4.1 close codes the gateway sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_TEXT = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


def is_valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4.1/§7.4.2 and the IANA registry: the codes a peer may put
    on the wire (1004-1006 and 1015 never go on it, 1016-2999 are unassigned,
    5000 and up do not exist). The client's receive path uses it; the
    gateway's listeners keep their own copies (``_pure`` and ``_ext`` import
    nothing from ``protocol``), held equal by tests/test_client_wire.py."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WirehubError(Exception):
    """A request failed; the client gets ``{"type":"error","code":...}``."""

    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, id: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id


class InvalidMessage(WirehubError):
    code = ErrorCode.INVALID_MESSAGE


class UnknownType(WirehubError):
    code = ErrorCode.UNKNOWN_TYPE


class InvalidField(WirehubError):
    code = ErrorCode.INVALID_FIELD


class InvalidChannel(WirehubError):
    code = ErrorCode.INVALID_CHANNEL


class Unavailable(WirehubError):
    """The shared broker (Redis) is unreachable, refused the command or has
    too much waiting: nothing was published; try again later."""

    code = ErrorCode.UNAVAILABLE


class EngineUnavailable(WirehubError):
    """The engine behind a source (dockerd) cannot be reached; retry later."""

    code = ErrorCode.ENGINE_UNAVAILABLE


class EngineForbidden(WirehubError):
    """The engine, or the permissions on its socket, refused the gateway."""

    code = ErrorCode.ENGINE_FORBIDDEN


class EngineError(WirehubError):
    """The engine answered a request with an error (the text is the engine's)."""

    code = ErrorCode.ENGINE_ERROR


class ContainerNotFound(WirehubError):
    code = ErrorCode.CONTAINER_NOT_FOUND


class TooManySubscriptions(WirehubError):
    code = ErrorCode.TOO_MANY_SUBSCRIPTIONS


class NotSubscribed(WirehubError):
    code = ErrorCode.NOT_SUBSCRIBED


class RateLimited(WirehubError):
    code = ErrorCode.RATE_LIMITED


class Forbidden(WirehubError):
    code = ErrorCode.FORBIDDEN


class NotAuthenticated(WirehubError):
    code = ErrorCode.NOT_AUTHENTICATED


class Rejected(WirehubError):
    """Raise from a middleware to refuse a message (``code`` may be overridden)."""

    code = ErrorCode.REJECTED

    def __init__(self, message: str, *, code: str = ErrorCode.REJECTED,
                 id: str | int | None = None) -> None:
        super().__init__(message, id=id)
        self.code = code


class FileError(WirehubError):
    """A file transfer failed: ``code`` is a ``FileCode`` (or ``forbidden``);
    the ``error`` message names the file, and the chunk for a chunk's error."""

    def __init__(self, code: str, message: str, *, file_id: str | None = None,
                 index: int | None = None, id: str | int | None = None) -> None:
        super().__init__(message, id=id)
        self.code = code
        self.file_id = file_id
        self.index = index


class AuthCode:
    """The ``code`` values of ``auth_error`` messages and 401 bodies (docs/security.md)."""

    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    SUBJECT_CHANGED = "subject_changed"
    AUTH_NOT_CONFIGURED = "auth_not_configured"   # an auth message on a gateway without a key


class AuthError(Exception):
    """A token was refused; ``code`` is an ``AuthCode``, the message says why."""

    def __init__(self, message: str, code: str = AuthCode.INVALID_TOKEN) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
