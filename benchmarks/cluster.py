"""What the Ray job path costs: the same embed job submitted with `vaectl submit` vs run by a
driver started directly against the same cluster.

A two-node cluster of `ray start` processes on 127.0.0.1 with token auth (tests/local_cluster.py,
the one the integration test uses): a CPU head and a node with 2 CPUs. Both paths run
`vaectl embed` on the same synthetic vectors with the same untrained model version, each into a
fresh output directory; they alternate, `--repeats` times each. The baseline is the direct
driver (`RAY_ADDRESS=<gcs> vaectl embed ...`, a new process each time, as a job's driver is); the
job path adds the working-dir upload, the job supervisor and the log stream.

    python -m benchmarks.cluster [--rows 400000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchmarks.common import parse_args, save, untrained_version, write_vectors

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the cluster helper the integration test uses
from helpers.local_cluster import local_cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, rows=20_000, repeats=1)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = write_vectors(work / "vectors", args.rows, 64)
        version = untrained_version(work / "models", 64)
        embed = [
            "embed",
            "--data",
            str(data),
            "--model-root",
            str(work / "models"),
            "--model-version",
            version,
            "--num-encoders",
            "2",
            "--cpus-per-encoder",
            "1",
        ]
        with local_cluster(work, head_cpus=1, nodes=[{"num_cpus": 2}]) as cluster:
            direct_env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
            runs: dict[str, list[float]] = {"direct": [], "submitted": []}
            for repeat in range(args.repeats):
                for path in ("direct", "submitted"):
                    catalog = work / f"out-{path}-{repeat}"
                    output = [
                        "--catalog",
                        f"sqlite:///{catalog}/catalog.db",
                        "--warehouse",
                        str(catalog / "warehouse"),
                    ]
                    if path == "direct":
                        command = [sys.executable, "-m", "ray_jobs.cli", *embed, *output]
                    else:
                        command = [
                            sys.executable,
                            "-m",
                            "ray_jobs.cli",
                            "submit",
                            embed[0],
                            "--address",
                            cluster.address,
                            "--working-dir",
                            str(REPO),
                            "--python",
                            sys.executable,
                            *embed[1:],
                            *output,
                        ]
                    started = time.perf_counter()
                    result = subprocess.run(
                        command,
                        check=False,
                        env=direct_env if path == "direct" else cluster.env,
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                    )
                    seconds = time.perf_counter() - started
                    if result.returncode != 0:
                        raise SystemExit(
                            f"{path} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                        )
                    runs[path].append(seconds)
                    print(f"{path:>9} run {repeat + 1}: {seconds:.2f} s", flush=True)

    direct, submitted = median(runs["direct"]), median(runs["submitted"])
    result = {
        "rows": args.rows,
        "dim": 64,
        "repeats": args.repeats,
        "cluster": "head (1 CPU) + node (2 CPUs), ray start on 127.0.0.1",
        "direct_seconds": [round(s, 2) for s in runs["direct"]],
        "submitted_seconds": [round(s, 2) for s in runs["submitted"]],
        "direct_median_s": round(direct, 2),
        "submitted_median_s": round(submitted, 2),
        "job_overhead_median_s": round(submitted - direct, 2),
        "submitted_over_direct": round(submitted / direct, 3),
    }
    print(
        f"vaectl submit / direct driver (median of {args.repeats}): {submitted:.2f} / {direct:.2f} s = "
        f"{submitted / direct:.3f}x (overhead {submitted - direct:+.2f} s)"
    )
    save("cluster", result)


if __name__ == "__main__":
    main()
