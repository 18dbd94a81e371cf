"""A/B traffic split between loaded model versions (AB_SPLIT="3:0.9,4:0.1").

A user is assigned by a stable hash of the user id (SHA-256, not Python's per-process hash), so
the same user sees the same version from every worker and after every restart; shares are the
fractions of the hash space each version gets, in the order given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from serving.model_store import VERSION_NAME

TOLERANCE = 1e-6


@dataclass(frozen=True)
class TrafficSplit:
    shares: tuple[tuple[int, float], ...]  # (version, share), shares summing to 1

    @classmethod
    def parse(cls, text: str) -> TrafficSplit | None:
        """`"3:0.9,4:0.1"` -> TrafficSplit; empty -> None. A ValueError names what is wrong."""
        text = text.strip()
        if not text:
            return None
        shares, where = [], f"AB_SPLIT={text!r}"
        for part in text.split(","):
            version, sep, share = part.strip().partition(":")
            if not sep or not VERSION_NAME.fullmatch(version.strip()):
                raise ValueError(f"{where}: expected VERSION:SHARE pairs such as "
                                 f"'3:0.9,4:0.1', got {part.strip()!r}")
            try:
                value = float(share)
            except ValueError:
                raise ValueError(f"{where}: share {share.strip()!r} is not a number") from None
            if not 0 < value <= 1:
                raise ValueError(f"{where}: share {value} of version {version.strip()} must "
                                 "be in (0, 1]")
            shares.append((int(version), value))
        versions = [v for v, _ in shares]
        if len(set(versions)) != len(versions):
            raise ValueError(f"{where}: a version is named twice")
        total = sum(share for _, share in shares)
        if abs(total - 1.0) > TOLERANCE:
            raise ValueError(f"{where}: shares add up to {total:g}, not 1")
        return cls(tuple(shares))

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(v for v, _ in self.shares)

    def assign(self, user_id: str) -> int:
        """The version this user sees."""
        digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).digest()
        point = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
        edge = 0.0
        for version, share in self.shares:
            edge += share
            if point < edge:
                return version
        return self.shares[-1][0]  # float rounding at the very top

    def __str__(self) -> str:
        return ",".join(f"{v}:{share:g}" for v, share in self.shares)
