"""The secure sum's messages and their one byte encoding.

Each message is a frozen pydantic model with ``encode() -> bytes`` and
``Model.decode(data)``, so an app can carry it as one ``bytes`` value. The encoding is
canonical and versioned::

    b"fediim-secagg/1\\n" | uint32 LE header length | header | payload

The header is canonical JSON (sorted keys, bytes as hex) holding ``kind`` and every field
but the payload; only :class:`MaskedInput` has a payload, its masked vector as raw
little-endian uint64 words, whose count the header declares. Anything else (another
magic, a short or long buffer, a header that is not JSON or not this kind, a field of the
wrong type or size) raises :class:`~fediim.errors.MessageError` naming what was wrong.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, ClassVar, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fediim.errors import MessageError
from fediim.io.validation import format_validation_error
from fediim.protocol.secure_sum.keys import FORMAT, KEY_BYTES, canonical_json
from fediim.protocol.secure_sum.shamir import SHARE_BYTES
from fediim.protocol.site_config import SITE_ID_PATTERN

__all__ = ["AdvertisementBroadcast", "KeyAdvertisement", "MAGIC", "MaskedInput",
           "MaskedInputRequest", "SecureSumMessage", "ShareBundle", "ShareDelivery",
           "UnmaskReply", "UnmaskRequest"]

MAGIC = FORMAT.encode("ascii") + b"\n"
_MAX_HEADER = 1 << 24

RunId = Annotated[int, Field(ge=0, lt=2 ** 64)]
Session = Annotated[int, Field(ge=0)]
SiteId = Annotated[str, Field(pattern=SITE_ID_PATTERN)]
PublicKey = Annotated[bytes, Field(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Share = Annotated[bytes, Field(min_length=SHARE_BYTES, max_length=SHARE_BYTES)]


class SecureSumMessage(BaseModel):
    """Base of every secure-sum message: the codec (see module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              ser_json_bytes="hex", val_json_bytes="hex")
    kind: ClassVar[str]
    #: The field carried raw after the header, if any.
    payload_field: ClassVar[str | None] = None

    def encode(self) -> bytes:
        """This message's canonical bytes."""
        payload_fields = {self.payload_field} if self.payload_field else set()
        header = {"kind": self.kind,
                  **self.model_dump(mode="json", exclude=payload_fields)}
        header_bytes = canonical_json(header)
        payload = getattr(self, self.payload_field) if self.payload_field else b""
        return MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """The message encoded in ``data``, or :class:`MessageError`."""
        header, payload = _split(data, cls.__name__)
        if header.pop("kind", None) != cls.kind:
            raise MessageError(f"{cls.__name__}: not a {cls.kind!r} message")
        if not cls.payload_field and payload:
            raise MessageError(f"{cls.__name__}: {len(payload)} unexpected bytes after the "
                               "header")
        try:
            if cls.payload_field:  # the header of a payload message holds JSON types only
                return cls.model_validate({**header, cls.payload_field: payload})
            return cls.model_validate_json(json.dumps(header))
        except ValidationError as exc:
            raise MessageError(format_validation_error(exc, cls.__name__)) from None


def _split(data: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    """A message's JSON header and its raw payload, checked for shape."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    start = len(MAGIC) + 4
    if len(data) < start or not data.startswith(MAGIC):
        raise MessageError(f"{what}: not a {FORMAT} message (bad magic or truncated)")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    if size > _MAX_HEADER or start + size > len(data):
        raise MessageError(f"{what}: the declared header length {size} exceeds the message")
    try:
        header = json.loads(data[start:start + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{what}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MessageError(f"{what}: the header is not a JSON object")
    return header, data[start + size:]


class KeyAdvertisement(SecureSumMessage):
    """Round 1, site -> coordinator: the site's channel key ``c_public``, one mask key per
    session ``s_publics``, and its identity-key signature over them and the run's shape."""

    kind: ClassVar[str] = "advertise_keys"
    run_id: RunId
    site_id: SiteId
    c_public: PublicKey
    s_publics: tuple[PublicKey, ...]
    n_sessions: Annotated[int, Field(ge=1)]
    threshold: Annotated[int, Field(ge=2)]
    signature: Annotated[bytes, Field(max_length=256)]


class AdvertisementBroadcast(SecureSumMessage):
    """Round 1, coordinator -> every site: the advertisements it received."""

    kind: ClassVar[str] = "advertisements"
    run_id: RunId
    advertisements: tuple[KeyAdvertisement, ...]


class ShareBundle(SecureSumMessage):
    """Round 2, site -> coordinator: ``sender``'s encrypted shares, by recipient."""

    kind: ClassVar[str] = "share_keys"
    run_id: RunId
    sender: SiteId
    ciphertexts: dict[SiteId, bytes]


class ShareDelivery(SecureSumMessage):
    """Round 2, coordinator -> one site: the encrypted shares for ``recipient``, by sender
    (the senders are U2, the sites that shared their keys)."""

    kind: ClassVar[str] = "share_delivery"
    run_id: RunId
    recipient: SiteId
    ciphertexts: dict[SiteId, bytes]


class MaskedInputRequest(SecureSumMessage):
    """Round 3, coordinator -> sites: session ``session``'s participants (sorted) and its
    vector length (declared at setup, or announced here)."""

    kind: ClassVar[str] = "masked_input_request"
    run_id: RunId
    session: Session
    participants: tuple[SiteId, ...]
    length: Annotated[int, Field(ge=1)]


class MaskedInput(SecureSumMessage):
    """Round 3, site -> coordinator: the masked vector y_u (``length`` uint64, LE)."""

    kind: ClassVar[str] = "masked_input"
    payload_field: ClassVar[str | None] = "masked"
    run_id: RunId
    session: Session
    site_id: SiteId
    length: Annotated[int, Field(ge=1)]
    masked: bytes

    @model_validator(mode="after")
    def _declared_length(self) -> Self:
        if len(self.masked) != 8 * self.length:
            raise ValueError(f"the masked vector has {len(self.masked)} bytes, not the "
                             f"declared {self.length} uint64 words")
        return self

    @property
    def vector(self) -> np.ndarray:
        """The masked vector as uint64."""
        return np.frombuffer(self.masked, dtype="<u8").astype(np.uint64)


class UnmaskRequest(SecureSumMessage):
    """Round 4, coordinator -> survivors: who sent a masked input (``survivors``, U3) and
    who did not (``dropped``) among the session's participants."""

    kind: ClassVar[str] = "unmask_request"
    run_id: RunId
    session: Session
    survivors: tuple[SiteId, ...]
    dropped: tuple[SiteId, ...]


class UnmaskReply(SecureSumMessage):
    """Round 4, survivor -> coordinator: its shares of each survivor's self-mask seed for
    this session and of each dropped site's mask key for this session, by owner."""

    kind: ClassVar[str] = "unmask_reply"
    run_id: RunId
    session: Session
    site_id: SiteId
    self_mask_shares: dict[SiteId, Share]
    key_shares: dict[SiteId, Share]
