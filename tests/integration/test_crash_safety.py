"""Crash safety, proven by killing (benchmarks/crash.py): pipeline steps run as their own processes,
SIGKILLed at named points between two writes and at a random moment, then run again as the docs say;
after every completed step every batch is whole, no data file is orphaned or missing, online equals
each key's latest row of the current version, no decision is logged twice and the lock is free.
A short seeded sweep; `python -m benchmarks.crash` runs the long one."""

from benchmarks.crash import sweep

# the points a quiet day's step passes (the long sweep adds switch, rollback, backfill)
QUIET_DAY = ("embed.committed", "decisions.appended", "publish.recorded_written", "publish.written")


def test_steps_killed_at_named_points_and_at_random_are_finished_by_their_retry(tmp_path):
    result = sweep(tmp_path, days=2, kills_per_day=2, seed=1, points=QUIET_DAY, nth_point_kills=False)
    assert result.violations == []
    assert result.steps == 2 and len(result.kills) >= 3, result.kills
    assert len(result.points()) >= 2, result.kills
    # the first day trains the first version, then embeds, monitors and publishes it
    assert {"embedded", "monitored", "published", "switched"} <= set(result.decisions[1])
    assert {"embedded", "monitored", "published"} <= set(result.decisions[2])
