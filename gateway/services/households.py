"""The household register: which households exist, and the secret each proves itself with.

A vote counts only for a household in this register, kept on the box and provided by the
installer (`services.households`, a YAML file; `cgw household` adds an entry). Each household is
its building and unit with a hashed PIN or card number: a terminal (or an API client) sends the
PIN or card the resident gives, and the register checks it. The secrets are held only as salted
PBKDF2-SHA256 hashes, compared in constant time (docs/privacy.md).

```yaml
households:
  - {building: "3", unit: "2-301", secret: "pbkdf2-sha256$20000$<salt>$<hash>"}
```
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from gateway.datafiles import load_model
from gateway.files import write_private

# A PIN has few digits, so the file must stay private (mode 0600) whatever the count; this cost
# keeps a register of a few hundred households quick to write on a Pi-class box.
ITERATIONS = 20_000
SCHEME = "pbkdf2-sha256"


class Household(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    building: str = Field(min_length=1, max_length=32)
    unit: str = Field(min_length=1, max_length=32)
    secret: str = Field(pattern=rf"^{SCHEME}\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$")

    @property
    def key(self) -> str:
        return f"{self.building}/{self.unit}"


class RegisterFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    households: list[Household] = Field(default_factory=list)


def hash_secret(secret: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _matches(secret: str, stored: str) -> bool:
    _, iterations, salt, _ = stored.split("$")
    return hmac.compare_digest(hash_secret(secret, base64.b64decode(salt), int(iterations)), stored)


class HouseholdRegister:
    """The households that may vote; `None` path: no register, so no vote counts."""

    def __init__(self, households: list[Household], source: Path | None = None) -> None:
        self._by_key = {h.key: h for h in households}
        self.source = source

    @classmethod
    def load(cls, path: Path | None) -> HouseholdRegister:
        if path is None:
            return cls([], None)
        return cls(load_model(path, RegisterFile, "household register").households, path)

    def __len__(self) -> int:
        return len(self._by_key)

    def verify(self, household: str, secret: str | None) -> bool:
        """Whether `household` ("building/unit") is registered and `secret` is its PIN or card."""
        entry = self._by_key.get(household)
        if entry is None or not secret:
            # Hash anyway, so the time taken does not say whether the household exists.
            hash_secret(secret or "-", b"\0" * 12)
            return False
        return _matches(secret, entry.secret)


def add_household(path: Path, building: str, unit: str, secret: str) -> int:
    """Add (or replace) a household's entry in the register file; returns the number of entries."""
    current = load_model(path, RegisterFile, "household register") if path.exists() else RegisterFile()
    entry = Household(building=building, unit=unit, secret=hash_secret(secret))
    kept = [h for h in current.households if h.key != entry.key] + [entry]
    write_register(path, kept)
    return len(kept)


def write_register(path: Path, households: list[Household]) -> None:
    """Write the register, readable by its owner only (it holds hashes of short PINs)."""
    text = yaml.safe_dump({"households": [h.model_dump() for h in households]}, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text.encode())
