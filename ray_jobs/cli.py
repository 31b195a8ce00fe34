"""`vaectl <job> [options]`: one console script for every job, so `ray job submit -- vaectl ...` works."""

from __future__ import annotations

import importlib
import sys

from ray_jobs.common import run_cli

# name: (module, its config class, summary)
JOBS = {
    "train": ("ray_jobs.train", "TrainConfig", "train a VAE with Ray Train and save a model version"),
    "embed": ("ray_jobs.embed", "EmbedConfig", "encode a Parquet dataset with a model version (Ray Data)"),
    "publish": ("ray_jobs.publish", "PublishConfig", "register the Feast definitions and write embeddings online"),
    "monitor": ("ray_jobs.monitor", "MonitorConfig", "drift, version movement, anomaly rate and collapse of a batch's latents; HTML report"),
    "demo": ("ray_jobs.demo", "DemoConfig", "run train, embed and publish end to end on scikit-learn's digits"),
    "submit": ("ray_jobs.submit", None, "run one of the jobs above on a Ray cluster: logs stream here, exit code is the job's"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        print("usage: vaectl {" + ",".join(JOBS) + "} [--config YAML] [--option VALUE ...]\n", file=sys.stderr)
        for name, (_, _, summary) in JOBS.items():
            print(f"  {name:<8} {summary}", file=sys.stderr)
        print("\n`vaectl <job> --help` lists a job's options.", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(JOBS[argv[0]][0])  # imported lazily: Ray and Feast are slow to import
    run_cli(module.main, argv[1:])


if __name__ == "__main__":
    main()
