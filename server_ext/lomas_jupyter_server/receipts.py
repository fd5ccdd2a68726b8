"""Signed release receipts: the service signs every answer it hands out, so that a grader (or anyone with the
service's public key) can check offline that the numbers in a notebook came from this service, unedited, and
what they cost.

A receipt signs the answer document exactly as the client receives it (minus the receipt itself), as canonical
JSON: sorted keys, no spaces, UTF-8. Ed25519 signatures are deterministic, and need nothing but the public key
to check. The private key is a PEM file (PKCS#8, mode 0600) made at first start; replicas must share it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

FORMAT = "lomas-receipt/1"
KEY_FILE = "receipt-signing-key.pem"


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes a receipt signs: the same on every machine that parses the same JSON."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class ReceiptSigner:
    """Holds the service's signing key; `sign(answer)` returns the receipt that goes with it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_raw = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(self.public_raw).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, path: str | Path) -> ReceiptSigner:
        """The key in `path`, made there (readable by this OS user only) if there is none yet."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another replica or process made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "wb") as out:
                    out.write(pem)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the receipt signing key must be an Ed25519 private key")
        return cls(key)

    def public_json(self) -> dict[str, str]:
        pem = self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return {"algorithm": "Ed25519", "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_raw).decode(), "pem": pem}

    def sign(self, answer: dict[str, Any]) -> dict[str, str]:
        signature = self._key.sign(canonical_bytes(answer))
        # the public key travels along so that a notebook can be checked for edits anywhere; whether the key is
        # this service's is what `lomas-verify --key` checks
        return {"format": FORMAT, "algorithm": "Ed25519", "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_raw).decode(),
                "signature": base64.b64encode(signature).decode()}
