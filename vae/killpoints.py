"""Named points where the crash tests kill the process for real (SIGKILL, no cleanup, no `finally`):
between two writes whose order the design relies on. Free when unused: one dictionary lookup.

    VAE_KILL_AT=embed.settled            die the first time the point is reached
    VAE_KILL_AT=embed.committed:3        die the third time
    VAE_KILL_AT=any:5                    die at the fifth point reached, whichever it is
    VAE_KILL_LOG=/tmp/points.txt         append every point reached (the points a step passes)
    VAE_PAUSE_AT=publish.recorded=5      sleep 5 s there instead (widens a race window for a test)

Production never sets these variables; tests/integration/test_crash_safety.py does.
"""

from __future__ import annotations

import os
import signal
import time

_reached: dict[str, int] = {}


def killpoint(name: str) -> None:
    """Die here if VAE_KILL_AT names this point (and this is the n-th time it is reached); pause if
    VAE_PAUSE_AT names it."""
    target = os.environ.get("VAE_KILL_AT")
    trace = os.environ.get("VAE_KILL_LOG")
    pause = os.environ.get("VAE_PAUSE_AT")
    if not target and not trace and not pause:
        return
    if pause and pause.partition("=")[0] == name:
        time.sleep(float(pause.partition("=")[2]))
    _reached[name] = _reached.get(name, 0) + 1
    if trace:
        with open(trace, "a") as log:
            log.write(f"{name}\n")
    if target:
        point, _, nth = target.partition(":")
        any_point = point == "any" and sum(_reached.values()) == int(nth or 1)
        if any_point or (point == name and _reached[name] == int(nth or 1)):
            os.kill(os.getpid(), signal.SIGKILL)
