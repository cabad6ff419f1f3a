"""What the writer reports about itself: counters, latencies and the failure it is in."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WriterStats", "format_fields", "percentile"]


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the writer's counters (rows unless named otherwise).

    ``rows_written`` counts rows this writer committed (directly or from the spool);
    ``rows_replayed`` the part of them that came back from the spool, including batches
    adopted from a writer that stopped; ``rows_spooled`` rows this writer put in the spool;
    ``rows_rejected`` quotes ``add`` refused as invalid; ``rows_refused`` rows the server
    refused, now in the dead-letter file; ``retries`` failed write attempts that were retried;
    ``batches`` committed transactions. Latencies are of one batch's write (pool checkout,
    COPY, commit), in seconds. ``last_error`` describes the latest failure while writes are
    failing (with the fix, for a configuration failure) and ``failure_class`` names its class
    (``"passing"``, ``"configuration"``...); both are ``None`` once a write succeeds.
    """

    rows_added: int
    rows_written: int
    rows_spooled: int
    rows_replayed: int
    rows_rejected: int
    rows_refused: int
    rows_pending: int
    rows_in_spool: int
    retries: int
    batches: int
    last_flush_latency_s: float | None
    flush_latency_p50_s: float | None
    flush_latency_p99_s: float | None
    last_error: str | None = None
    failure_class: str | None = None

    def as_dict(self) -> dict[str, int | float | str | None]:
        """The fields as a plain dict (what the log lines carry)."""
        return asdict(self)


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def format_fields(stats: WriterStats) -> str:
    values: dict[str, Any] = stats.as_dict()
    return " ".join(
        f"{key}={value:.6f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
    )
