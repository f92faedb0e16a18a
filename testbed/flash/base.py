"""What every flasher returns and the progress callback it reports to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

Progress = Callable[[str, int, int | None], None]
"""``progress(phase, done, total)``: phase is "measure" (finding the uncompressed size),
"write" or "verify"; ``done`` and ``total`` are bytes of the uncompressed image
(``total`` is None while still unknown)."""


@dataclass(frozen=True)
class FlashResult:
    """What was written where, and whether reading it back gave the same bytes.

    ``bytes_written`` is the uncompressed image length (the extent written on the
    target); ``bytes_skipped`` of it were all-zero blocks not sent to the device
    because the target already read as zeros there (see ``zeroing``). ``sha256`` is the
    hash of the uncompressed image; ``verified`` is True when the target's first
    ``bytes_written`` bytes were read back and hashed to the same value.
    """

    image: str
    target: str
    bytes_written: int
    bytes_skipped: int
    seconds: float
    sha256: str
    verified: bool
    zeroing: str

    def as_evidence(self) -> dict[str, Any]:
        return asdict(self)
