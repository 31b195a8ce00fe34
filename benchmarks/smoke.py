"""Every benchmark at its smoke size (`--smoke`), each in its own process as `make bench` runs it: it must
complete and write its JSON. Seconds to a minute or two each, mostly Ray Train's fixed cost, which is
waiting rather than computing: three run at a time. .ci/run runs this (`make bench-smoke`) so that no
benchmark can break unseen. The figures are not looked at.

The data the benchmarks read from ../shared/data (MNIST's test split, the ODDS sets) is replaced by
small stand-ins in the same formats, so the run needs nothing beside the checkout.

    python -m benchmarks.smoke [names...]     # default: every benchmark, the longest first
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# the longest first, so that the last to finish starts early
BENCHMARKS = (
    "train",
    "registry",
    "crash",
    "year",
    "month",
    "upstream",
    "publish",
    "serve",
    "drift",
    "gpu",
    "cluster",
    "anomaly",
    "anomaly_variants",
    "embed",
    "history",
    "security",
)
AT_A_TIME = 3


def stand_in_mnist(directory: Path, rows: int = 800) -> Path:
    """MNIST's IDX files (gzip), with random 28x28 strokes instead of digits."""
    rng = np.random.default_rng(0)
    images = (rng.random((rows, 28, 28)) < 0.15).astype(np.uint8) * 255
    labels = rng.integers(0, 10, rows).astype(np.uint8)
    directory.mkdir(parents=True)
    for name, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
        header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
        with gzip.open(directory / f"t10k-{name}-ubyte.gz", "wb") as f:
            f.write(header + array.tobytes())
    return directory


def stand_in_odds(directory: Path, rows: int = 400) -> Path:
    """An ODDS .mat file (X, y) for every set the anomaly benchmark knows, 5% of rows planted."""
    from scipy.io import savemat

    from benchmarks.anomaly import ODDS

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for name in ODDS:
        x = rng.standard_normal((rows, 6))
        y = np.zeros(rows, int)
        y[: rows // 20] = 1
        x[y == 1] += 4.0
        savemat(directory / f"{name}.mat", {"X": x, "y": y[:, None]})
    return directory


def run(name: str, work: Path, env: dict[str, str]) -> tuple[bool, float, str]:
    """(passed, seconds, what went wrong) of one benchmark's smoke run."""
    command = [sys.executable, "-m", f"benchmarks.{name}", "--smoke"]
    if name in ("anomaly", "anomaly_variants"):
        command += ["--data-dir", str(work / "odds")]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return (
            False,
            seconds,
            f"exit code {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}",
        )
    written = Path(env["BENCH_RESULTS"]) / f"{name}.json"
    try:
        json.loads(written.read_text())
    except (OSError, ValueError) as error:
        return False, seconds, f"no JSON at {written}: {error}"
    return True, seconds, ""


def main(names: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as scratch:
        work = Path(scratch)
        stand_in_mnist(work / "mnist")
        stand_in_odds(work / "odds")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each starts its own Ray
        env |= {"BENCH_RESULTS": str(work / "results"), "MNIST_DIR": str(work / "mnist")}
        env |= {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
        with ThreadPoolExecutor(AT_A_TIME) as pool:
            runs = {name: pool.submit(run, name, work, env) for name in names}
            failures = []
            for name, future in runs.items():
                passed, seconds, problem = future.result()
                print(f"{name:<10} {'ok' if passed else 'FAILED'} in {seconds:5.1f} s", flush=True)
                if not passed:
                    failures.append(f"benchmarks.{name} --smoke: {problem}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(BENCHMARKS)))
