"""Release receipts on the kernel side: what a notebook output keeps of a release, and the offline check of it.

The service signs each answer (the whole JSON document it sends, without the receipt) with Ed25519, over JSON
with sorted keys and no spaces. A displayed DP answer keeps the signed document and its receipt in the
output's metadata (`lomas`), so the .ipynb file carries everything `lomas-verify` needs, offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "lomas-receipt/1"
METADATA_KEY = "lomas"


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes the service signed (the same rule as the service's, kept here: the kernel imports nothing of
    the server)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def split(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A service's answer -> (the signed document, its receipt or None)."""
    answer = {k: v for k, v in raw.items() if k != "receipt"}
    return answer, raw.get("receipt")


@dataclass(frozen=True)
class Check:
    """The outcome of checking one receipt: `problem` is None when the signature holds."""

    key_id: str
    problem: str | None
    trusted: bool  # signed by a key the caller named (--key), not only by the key the receipt carries


def check(answer: dict[str, Any], receipt: Any, trusted_keys: dict[str, bytes] | None = None) -> Check:
    """Does `receipt` sign exactly `answer`? With `trusted_keys` (key id -> raw key), only those keys count."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT or receipt.get("algorithm") != "Ed25519":
        return Check("", "not a lomas receipt", False)
    try:
        public_raw = base64.b64decode(receipt["public_key"], validate=True)
        signature = base64.b64decode(receipt["signature"], validate=True)
        public = Ed25519PublicKey.from_public_bytes(public_raw)
    except (KeyError, TypeError, ValueError, binascii.Error):
        return Check(str(receipt.get("key_id", "")), "the receipt is damaged", False)
    kid = key_id(public_raw)
    if receipt.get("key_id") != kid:
        return Check(kid, "the receipt's key id does not match its key", False)
    if trusted_keys is not None and kid not in trusted_keys:
        return Check(kid, f"signed by key {kid}, which is not one you trust (--key)", False)
    try:
        public.verify(signature, canonical_bytes(answer))
    except InvalidSignature:
        return Check(kid, "the signature does not match: the answer was changed after it was released", False)
    return Check(kid, None, trusted_keys is not None)


def load_key(text_or_path: str) -> tuple[str, bytes]:
    """A trusted public key: a file or text holding a PEM key (`lomas-admin key`), the raw key in base64, or the
    JSON of the service's receipts/key endpoint -> (key id, raw key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(text_or_path)
    text = path.read_text() if len(text_or_path) < 4096 and path.is_file() else text_or_path
    text = text.strip()
    if text.startswith("{"):
        text = str(json.loads(text).get("public_key", ""))
    if "BEGIN PUBLIC KEY" in text:
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError("not a key: give a PEM file from lomas-admin key, or the base64 public key") from None
        if len(raw) != 32:
            raise ValueError("not an Ed25519 public key (32 bytes in base64)")
    return key_id(raw), raw


def release_metadata(raw: dict[str, Any], note: str = "") -> dict[str, Any]:
    """What a displayed single-site release keeps in its output metadata."""
    answer, receipt = split(raw)
    return {METADATA_KEY: {"kind": "release", "answer": answer, "receipt": receipt, "note": note}}


def federated_metadata(answer: Any) -> dict[str, Any]:
    """What a displayed answer from several sites (a FederatedRelease) keeps: the query, and per site, in order,
    its signed answer and receipt, or why it is not included (with what a failed site charged)."""
    sites: list[dict[str, Any]] = []  # a list: a saved notebook's JSON sorts object keys
    for name, outcome in answer.sites.items():
        entry: dict[str, Any] = {"site": name, "dataset": outcome.dataset}
        if outcome.release is not None:
            entry["answer"], entry["receipt"] = split(outcome.release.raw)
        else:
            entry["problem"], entry["charged"] = outcome.problem, outcome.charged
        sites.append(entry)
    return {METADATA_KEY: {"kind": "federated", "dataset": answer.dataset, "sql": answer.sql, "sites": sites}}
