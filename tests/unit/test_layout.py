"""The layout's promises, checked in fresh interpreters: vae imports no Ray and no Feast, and holds no
Feast meaning either (no serving state, no feature_store.yaml); its model core and data preparation
import no catalog, registry or database; feast_embeddings imports no Ray and no job code; the job
configs none of torch, Ray or Feast; vae's top level is the model core and its plumbing, everything
else lives in a folder named for what it is; and the library's lazy exports all resolve."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the model core (torch only), the shared plumbing, and two old import paths registered pyfunc folders use
TOP_LEVEL = {"model", "losses", "encode", "impute", "diagnostics", "training", "training_report"}
TOP_LEVEL |= {"errors", "storage", "killpoints", "artifacts", "preprocessing", "secrets"}
SUBPACKAGES = {"data", "versions", "embeddings", "monitoring", "pipeline"}


def imported_after(statement: str) -> set[str]:
    script = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    return set(result.stdout.split())


def modules(folder: str) -> list[str]:
    """Every module of a package folder (e.g. "vae/data"), its subpackages' included."""
    root = REPO / folder
    return sorted(
        ".".join((*Path(folder).parts, *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in root.rglob("*.py")
    )


def imports(names: list[str]) -> str:
    return "\n".join(f"import {name}" for name in names)


def test_the_library_imports_neither_ray_nor_feast():
    loaded = imported_after(imports(modules("vae")))
    assert {"torch", "pyarrow"} <= loaded and not loaded & {"ray", "feast", "ray_jobs", "feast_embeddings"}


def test_the_model_core_and_data_preparation_import_no_catalog_registry_or_database():
    core = [f"vae.{name}" for name in TOP_LEVEL - {"artifacts"}] + modules("vae/data")
    loaded = imported_after(imports(core))
    assert "torch" in loaded and not loaded & {"pyiceberg", "mlflow", "sqlalchemy", "ray", "feast"}


def test_the_library_holds_no_feast_meaning():
    """No serving state or feature-store configuration in vae: no code there names Feast, a feature
    store, a feature view, the publication record or an online store (docstrings may say what the
    library's output is for). The distribution's own name, vae-feast, is the one exception."""
    words = ("feast", "feature_store", "featurestore", "feature_view", "publication", "online")
    found = []
    for path in sorted((REPO / "vae").rglob("*.py")):
        for node, text in _code_names_and_strings(ast.parse(path.read_text())):
            lowered = text.lower().replace("vae-feast", "")
            if any(word in lowered for word in words):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text[:60]!r}")
    assert not found, "\n".join(found)


def _code_names_and_strings(tree: ast.AST):
    """(node, text) for every identifier and every string constant that is not a docstring."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node, node.id
        elif isinstance(node, ast.Attribute):
            yield node, node.attr
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            yield node, node.name
        elif isinstance(node, ast.alias):
            yield node, node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node, node.value


def test_the_library_top_level_is_the_model_core_and_its_plumbing():
    vae = REPO / "vae"
    assert {p.stem for p in vae.glob("*.py")} - {"__init__"} == TOP_LEVEL
    assert {p.name for p in vae.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == SUBPACKAGES


def test_the_feast_package_and_the_feature_repo_import_no_ray_and_no_job_code():
    statements = [imports(modules("feast_embeddings"))]
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
