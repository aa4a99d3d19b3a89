"""base64url without padding (RFC 4648 section 5), as JOSE/Azure use it.

Caveat: ``b64u_decode`` accepts missing padding and also the standard alphabet's
'+' and '/' (some clients send them); it raises ValueError on anything else.
"""
from __future__ import annotations

import base64
import binascii
import re

_B64U_RE = re.compile(r"[A-Za-z0-9_\-+/]*={0,2}")


def b64u_encode(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64u_decode(s: str) -> bytes:
    if not isinstance(s, str) or not _B64U_RE.fullmatch(s):
        raise ValueError("not a base64url string")
    body = s.replace("+", "-").replace("/", "_").rstrip("=")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not a base64url string") from None


def int_to_b64u(i: int) -> str:
    return b64u_encode(i.to_bytes((i.bit_length() + 7) // 8, "big"))
