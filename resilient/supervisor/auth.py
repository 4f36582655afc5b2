"""Sealed coordination values.

Every value the supervisors put in the coordination store is sealed with AES-256-GCM under a key
derived from RUN_DIR/.secret (created 0600 by whichever supervisor comes first). The associated data
binds each value to its store key and to this job instance (Slurm job id + restart count), so a
value cannot be moved to another key or replayed into a later job. The store itself admits only
connections that prove a key derived from the same secret and instance (`Sealer.store_key`): a
client without the secret reads and writes nothing; a value that fails to open is rejected and reported.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12


class Forged(Exception):
    """A store value that does not open under the run's secret (tampered, foreign or replayed)."""


class Sealer:
    """Seal and open JSON values for one job instance."""

    def __init__(self, secret: bytes, instance: str) -> None:
        # A dedicated key per purpose: the file's secret is never used as a cipher key directly.
        self._aead = AESGCM(hmac.new(secret, b"resilient coordination store v1", hashlib.sha256).digest())
        self._instance = instance.encode()
        self.store_key = hmac.new(
            secret, b"resilient coordination store auth v1\0" + self._instance, hashlib.sha256
        ).digest()
        """Proves a connection to the store (store.py) belongs to this job instance."""

    def _aad(self, key: str) -> bytes:
        return self._instance + b"\0" + key.encode()

    def seal(self, key: str, value: Any) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, json.dumps(value, separators=(",", ":")).encode(), self._aad(key))

    def open(self, key: str, blob: bytes) -> Any:
        if len(blob) <= _NONCE_BYTES:
            raise Forged(f"{key}: {len(blob)} bytes, too short to be sealed")
        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(key))
        except InvalidTag:
            raise Forged(f"{key}: does not open under this run's secret (forged, tampered or replayed)") from None
        return json.loads(plain)
