"""The layout's promises: vae imports no Ray and no Feast, feast_embeddings no Ray and no job code,
the job configs none of torch, Ray or Feast; and the library's lazy exports all resolve."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_after(statement: str) -> set[str]:
    script = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return set(result.stdout.split())


def modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" for p in (REPO / package).glob("*.py") if p.stem != "__init__")


def test_the_library_imports_neither_ray_nor_feast():
    loaded = imported_after("\n".join(f"import {name}" for name in modules("vae")))
    assert {"torch", "pyarrow"} <= loaded and not loaded & {"ray", "feast", "ray_jobs", "feast_embeddings"}


def test_the_feast_package_and_the_feature_repo_import_no_ray_and_no_job_code():
    statements = [f"import {name}" for name in modules("feast_embeddings")]
    statements.append("feast_embeddings.EmbeddingsRepo('feature_repo').definitions")  # ran features.py
    loaded = imported_after("\n".join(statements))
    assert "feast" in loaded and not loaded & {"ray", "ray_jobs"}


def test_configs_and_the_cli_table_import_no_torch_ray_or_feast():
    loaded = imported_after(
        "import ray_jobs.config, ray_jobs.cli, ray_jobs.cluster, vae.errors, vae.monitoring.thresholds"
    )
    assert not loaded & {"torch", "ray", "feast", "pyarrow"}


@pytest.mark.parametrize("name", __import__("vae").__all__)
def test_every_name_the_library_exports_resolves(name):
    import vae

    assert getattr(vae, name) is not None
