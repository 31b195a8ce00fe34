"""Job options as `vaectl` flags, for tests that run the console script."""

from __future__ import annotations

import sys


def flags(**options: object) -> list[str]:
    """flags(latent_dim=4, data=path) -> ["--latent-dim", "4", "--data", "<path>"] (values as YAML text)."""
    return [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def vaectl_command(*arguments: str) -> list[str]:
    """`vaectl ARGUMENTS` as a subprocess runs it with this interpreter."""
    return [sys.executable, "-m", "ray_jobs.cli", *arguments]
