"""The bad-record policy shared by readers and ingesters: fail, or skip and count.

With a budget of 0 (the default everywhere) the first bad record raises its
RecordError unchanged. With K > 0, up to K bad records are skipped and counted
in a caller-visible stats dict, so a tool can report them; the (K+1)-th raises.
"""
from __future__ import annotations

from ringmoe.data.schema import RecordError


class BadRecordBudget:
    """Counts skipped records into `stats` ('bad_records', 'errors') and enforces `max_bad_records`."""

    def __init__(self, max_bad_records: int = 0, stats: dict | None = None) -> None:
        if max_bad_records < 0:
            raise RecordError(f"max_bad_records must be >= 0, got {max_bad_records}")
        self.max_bad = max_bad_records
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("records", 0)
        self.stats.setdefault("bad_records", 0)
        self.stats.setdefault("errors", [])

    def skip(self, message: str, n: int = 1) -> None:
        """Records `n` bad records described by `message`; raises once over budget."""
        self.stats["bad_records"] += n
        self.stats["errors"].append(message)
        if self.stats["bad_records"] > self.max_bad:
            if self.max_bad == 0:
                raise RecordError(message)
            raise RecordError(f"more than {self.max_bad} bad records "
                              f"({self.stats['bad_records']}); last: {message}")

    def good(self) -> None:
        self.stats["records"] += 1
