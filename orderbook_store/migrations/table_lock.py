"""The table's exclusive lock, taken without holding writers up behind a long reader.

``LOCK TABLE`` waits as long as any session holds a conflicting lock (a notebook's minute-long
read, autovacuum), and every insert that arrives meanwhile queues behind the waiting request:
the collector stalls for the whole wait, not for the few milliseconds the lock is then held.
Asked with a short ``lock_timeout`` and asked again after a pause, the request never stands in
the queue longer than one attempt; writers go on between attempts. Used by revisions whose
last step needs the table to itself (renames, attach, index drops).
"""

from __future__ import annotations

__all__ = ["lock_table_patiently"]


def lock_table_patiently(
    table: str = "orderbook_data",
    *,
    attempt_ms: int = 100,
    pause_s: float = 0.2,
    give_up_s: int = 600,
) -> str:
    """SQL that takes ``ACCESS EXCLUSIVE`` on ``table`` (and its partitions) for the rest of
    the transaction: attempts of ``attempt_ms``, ``pause_s`` apart, for at most ``give_up_s``
    (then it fails, naming the wait, and the revision changes nothing). The session's own
    ``lock_timeout`` is kept for the statements after it."""
    return f"""
DO $lock$
DECLARE
    deadline timestamptz := clock_timestamp() + interval '{int(give_up_s)} seconds';
    kept text := current_setting('lock_timeout');
BEGIN
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '{int(attempt_ms)}ms', true);
            LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;
            PERFORM set_config('lock_timeout', kept, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() > deadline THEN
                RAISE EXCEPTION 'other sessions held {table} for {int(give_up_s)} s without a '
                    'gap of {int(attempt_ms)} ms; nothing was changed: end them (or wait for '
                    'them), then upgrade again' USING ERRCODE = 'lock_not_available';
            END IF;
        END;
        PERFORM pg_sleep({float(pause_s)});
    END LOOP;
END
$lock$"""
