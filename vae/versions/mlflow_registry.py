"""MLflow, the registry of record: a training run is an MLflow run; a model version is a registered
MLflow version whose source is the version folder; `@champion` is the version Feast serves as
"current", `@challenger` the one the pipeline's gate judges.

    tracking   one MLflow run per training run (found again by the Ray run's name, so a resumed run
               continues it): the config as parameters, per-epoch metrics from rank 0, the final
               figures, the report and model.json as artifacts
    registry   one registered model per entity set (vae-<entity>); each version tagged with its name
               and folder. Registering adds two files to the folder (MLmodel and the pyfunc code,
               vae/mlflow_pyfunc.py): `mlflow.pyfunc.load_model("models:/vae-item@champion")` loads
               it through the project's loader; safetensors stays the only weight format
    aliases    moved by publish, rollback and the pipeline, before Feast's "current" (so a re-run of
               an interrupted switch finds them agreeing with where it was going)

The tracking URI: the job's option, else MLFLOW_TRACKING_URI; neither: nothing is tracked. No Ray and
no Feast here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vae.errors import InputError, first_line
from vae.secrets import redact
from vae.storage import filesystem, is_local, storage_errors, write_bytes_atomically

log = logging.getLogger("vae.versions.mlflow_registry")

TRACKING_ENV = "MLFLOW_TRACKING_URI"
MODELS_URI = "models:/"  # models:/<name>@<alias>, models:/<name>/<number>
CHAMPION, CHALLENGER = "champion", "challenger"
VERSION_TAG = "vae.model_version"  # on registered versions and on the training run
PATH_TAG = "vae.model_path"  # the version folder (local path or s3:// URL)
RUN_TAG = "vae.ray_run"  # <storage_path>/<run name>: a resumed Ray Train run finds its MLflow run by it
FINGERPRINT_TAG = "vae.data_fingerprint"  # on the training run: the training data's fingerprint
CODE_TAG = "vae.code_version"  # on the training run: the code that trained it
COLLAPSE_TAG = "vae.collapse_warning"  # on the training run, when its latent space collapsed
GATE_TAG = "vae.gate"  # on a registered version the pipeline's gate refused: "refused"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
MLMODEL_FILES = ("MLmodel", PYFUNC_CODE.name, "python_env.yaml", "requirements.txt", "conda.yaml")
PARAM_LIMIT = 6000  # MLflow's longest parameter value


class TrackingUnavailable(InputError):
    """The tracking server or store cannot be reached or refused a call: one line naming it."""


class TrackingRefused(TrackingUnavailable):
    """The server refused the job's credentials (401, 403): a configuration error that waiting does not
    fix, so never "continue untracked"."""


def _refused(error: Exception) -> str | None:
    """The one line for a server that refused the job's credentials (basic auth or a token proxy)."""
    text = str(error)
    code = next((c for c in (401, 403) if f"error code {c}" in text or f"status code {c}" in text), None)
    if code is None:
        return None
    if code == 403:
        return "the server refused access (403): the user in MLFLOW_TRACKING_USERNAME lacks the permission"
    if os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return "the server refused the credentials (401): check MLFLOW_TRACKING_USERNAME and _PASSWORD"
    return "the server wants credentials (401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def registered_model_name(entity: str) -> str:
    return f"vae-{entity}"


def resolve_tracking_uri(configured: str | None = None) -> str | None:
    """The configured URI, else MLFLOW_TRACKING_URI; None when neither is set (or the value is an
    unexpanded ${MLFLOW_TRACKING_URI} from a feature_store.yaml)."""
    uri = configured or os.environ.get(TRACKING_ENV)
    if not uri or uri.startswith("${"):
        return None
    return uri


def _fail_fast() -> None:
    # MLflow retries an unreachable server 7 times with backoff (minutes) and waits 120 s per
    # request; a job should say in seconds that its tracking server is down. Explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    # MLflow prints "View run ... at: <tracking URI>" straight to stdout, past any log redaction, and the
    # URI may hold a password; the jobs log the run and the URI themselves, redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Alembic logs every migration of a new SQLite store at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)


class Registry:
    """An MLflow tracking store and model registry at one URI."""

    def __init__(self, uri: str):
        _fail_fast()
        import mlflow

        self.uri = uri
        with self.calls("connect"):
            self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    @contextlib.contextmanager
    def calls(self, what: str) -> Iterator[None]:
        """Any failure of MLflow or of the store under it becomes one line naming the URI."""
        try:
            yield
        except InputError:
            raise
        except Exception as error:
            where = f"MLflow tracking at {redact(self.uri)}: {what} failed: "
            if refused := _refused(error):
                raise TrackingRefused(where + refused) from None
            raise TrackingUnavailable(f"{where}{type(error).__name__}: {redact(first_line(error))}") from None

    # -- tracking ---------------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        with self.calls(f"experiment {name}"):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri, name))

    def training_run(
        self, experiment: str, ray_run: str, params: dict[str, Any], tags: dict[str, str]
    ) -> str:
        """The MLflow run of a Ray Train run (its storage path and name): the one tagged with it
        (continued), else a new one with the config as parameters."""
        experiment_id = self.experiment_id(experiment)
        run_name = ray_run.rstrip("/").rsplit("/", 1)[-1]
        with self.calls("find the training run"):
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{ray_run}'", max_results=1
            )
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                log.info("MLflow: continuing run %s (%s) in %s", run_id, run_name, self.uri)
                return run_id
            run_tags = {name: redact(value) for name, value in {RUN_TAG: ray_run, **tags}.items()}
            run = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags)
            self.log_params(run.info.run_id, params)
        log.info(
            "MLflow: run %s (%s) in experiment %s at %s", run.info.run_id, run_name, experiment, self.uri
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(name, redact(str(value))[:PARAM_LIMIT]) for name, value in sorted(params.items())]
        with self.calls("log parameters"):
            for start in range(0, len(values), 100):  # MLflow takes 100 parameters per call
                self.client.log_batch(run_id, params=values[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(name, float(value), now, step) for name, value in metrics.items()]
        with self.calls("log metrics"):
            for start in range(0, len(values), 1000):
                self.client.log_batch(run_id, metrics=values[start : start + 1000])

    def finish_run(self, run_id: str, tags: dict[str, str], artifacts: list[tuple[str, str | None]]) -> None:
        """Tags, artifacts ((local path, artifact directory)) and the run marked finished."""
        with self.calls("finish the training run"):
            for name, value in tags.items():
                self.client.set_tag(run_id, name, redact(value))
            for path, directory in artifacts:
                if Path(path).is_dir():
                    self.client.log_artifacts(run_id, path, directory)
                else:
                    self.client.log_artifact(run_id, path, directory)
            self.client.set_terminated(run_id, "FINISHED")

    def fail_run(self, run_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.set_terminated(run_id, "FAILED")

    # -- registry ---------------------------------------------------------------------------------

    def find(self, name: str, version: str):
        """The MLflow version of `name` registered for a model version, or None."""
        with self.calls(f"search versions of {name}"):
            found = self.client.search_model_versions(
                f"name = '{name}' and tags.`{VERSION_TAG}` = '{version}'", max_results=1
            )
        return found[0] if found else None

    def register(self, name: str, version: str, path: str, run_id: str | None = None) -> str:
        """Register a model version (once; a second call returns the first registration's number).
        Its source is the version folder; a remote server takes no local paths, so then the folder is
        uploaded as the run's artifact `model` and registered from there."""
        if existing := self.find(name, version):
            return existing.version
        add_pyfunc_files(path)
        with self.calls(f"register {version} as {name}"):
            with contextlib.suppress(Exception):  # it exists: fine
                self.client.create_registered_model(name, description="VAE model versions of one entity set")
            source = path
            if is_local(filesystem(path)[0]) and not _local_store(self.uri):
                run_id = run_id or self._registration_run(name, version)
                self.client.log_artifacts(run_id, path, "model")
                source = f"runs:/{run_id}/model"
            elif is_local(filesystem(path)[0]):
                source = Path(path).absolute().as_uri()
            registered = self.client.create_model_version(
                name, source, run_id=run_id, tags={VERSION_TAG: version, PATH_TAG: redact(str(path))}
            )
        log.info("MLflow: %s registered as %s version %s", version, name, registered.version)
        return registered.version

    def _registration_run(self, name: str, version: str) -> str:
        """A run to upload a version that was trained untracked."""
        run = self.client.create_run(self.experiment_id(name), run_name=f"register {version}")
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def alias(self, name: str, alias: str) -> str | None:
        """The model version (our name) an alias points at; None when it is not set."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower():
                return None
            raise TrackingUnavailable(f"MLflow tracking at {self.uri}: {first_line(error)}") from None
        except Exception as error:
            raise TrackingUnavailable(
                f"MLflow tracking at {self.uri}: alias {alias} failed: {type(error).__name__}: "
                f"{first_line(error)}"
            ) from None
        return found.tags.get(VERSION_TAG, f"{name}/{found.version}")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        registered = self.find(name, version)
        if registered is None:
            raise InputError(f"model version {version} is not registered as {name} in MLflow at {self.uri}")
        with self.calls(f"set @{alias}"):
            self.client.set_registered_model_alias(name, alias, registered.version)
        log.info("MLflow: %s@%s -> version %s (%s)", name, alias, registered.version, version)

    def delete_alias(self, name: str, alias: str) -> None:
        with self.calls(f"delete @{alias}"), contextlib.suppress(Exception):
            self.client.delete_registered_model_alias(name, alias)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        if registered := self.find(name, version):
            with self.calls("tag a version"):
                for key, value in tags.items():
                    self.client.set_model_version_tag(name, registered.version, key, value)

    def resolve(self, uri: str) -> tuple[str, str]:
        """models:/<name>@<alias> or models:/<name>/<number> -> (model_root, version name)."""
        body = uri.removeprefix(MODELS_URI)
        name, at, alias = body.partition("@")
        with self.calls(f"resolve {uri}"):
            try:
                if at:
                    found = self.client.get_model_version_by_alias(name, alias)
                else:
                    name, _, number = body.partition("/")
                    found = self.client.get_model_version(name, number)
            except Exception as error:
                if _refused(error):
                    raise  # one line from calls(): the credentials, not the name
                where = redact(self.uri)
                raise InputError(
                    f"{uri}: not found in MLflow at {where} ({redact(first_line(error))})"
                ) from None
        path = found.tags.get(PATH_TAG)
        if not path:
            raise InputError(
                f"{uri} (version {found.version}) was not registered by vaectl: no {PATH_TAG} tag"
            )
        root, _, version = path.rstrip("/").rpartition("/")
        return root, version

    def run_tags(self, run_id: str) -> dict[str, str]:
        with self.calls(f"read run {run_id}"):
            return dict(self.client.get_run(run_id).data.tags)


def resolve_model_version(model_version: str, tracking_uri: str | None, fix: str) -> tuple[str | None, str]:
    """(model root or None, version name) of a job's model_version: models:/<name>@<alias> and
    models:/<name>/<number> resolved in the registry at tracking_uri to the folder the registered version
    records; any other value (a name, 'latest', 'current') as it is, without a root. `fix` says where
    the registry is configured, for the error when there is none."""
    if not model_version.startswith(MODELS_URI):
        return None, model_version
    if tracking_uri is None:
        raise InputError(f"model_version {model_version}: no MLflow registry to resolve it in; {fix}")
    return Registry(tracking_uri).resolve(model_version)


def load_pyfunc(model_uri: str):
    """`mlflow.pyfunc.load_model(model_uri)`, after checking the folder it loads against its manifest:
    MLflow executes the folder's mlflow_pyfunc.py while loading, so the check has to come first. The
    folder is downloaded once, checked, and loaded from that same copy."""
    import mlflow

    from vae.versions.artifacts import verify_folder

    _fail_fast()
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    verify_folder(local)
    return mlflow.pyfunc.load_model(local)


def add_pyfunc_files(path: str) -> None:
    """Make a version folder an MLflow pyfunc model (models from code): MLmodel, the code file and its
    environment, written next to model.json (which, and the weights, stay as they are), and added to
    the folder's manifest. Files the manifest already lists must match it (else the folder is refused,
    naming them); copies it does not list (a registration cut short) are replaced by this code's."""
    from vae.versions import manifest
    from vae.versions.artifacts import read_manifest, verify_folder

    fs, root = filesystem(path)
    listed = read_manifest(path)
    if listed is None:  # a folder saved before manifests: as then, never rewritten
        with storage_errors(path):
            if fs.exists(f"{root}/MLmodel"):
                return
    elif "MLmodel" in listed:
        verify_folder(path)
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        _save_pyfunc(model_dir)
        written = [name for name in MLMODEL_FILES if (model_dir / name).exists()]
        if listed is not None:
            listed = listed | {name: manifest.sha256((model_dir / name).read_bytes()) for name in written}
            version = Path(root).name
            document = manifest.manifest_bytes(version, listed)  # signed now: no key, no files written
        with storage_errors(path):
            for name in reversed(written):  # MLmodel last: a folder with it is complete
                if is_local(fs):
                    shutil.copy(model_dir / name, Path(root) / name)
                else:
                    fs.put_file(str(model_dir / name), f"{root}/{name}")
            if listed is not None:
                write_bytes_atomically(fs, f"{root}/{manifest.MANIFEST_FILE}", document)


def _save_pyfunc(model_dir: Path) -> None:
    import mlflow.pyfunc  # seconds: only when the files are missing

    from vae import __version__

    requirements = [f"vae-feast=={__version__}"]
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)  # "cannot infer a signature": the columns depend on the version
    try:
        mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_CODE), pip_requirements=requirements)
    finally:
        pyfunc_log.setLevel(level)


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch's scalars, and the validation KL per latent dimension as kl_per_dim/<i>."""
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
    for i, value in enumerate(metrics.get("val_kl_per_dim") or []):
        scalars[f"kl_per_dim/{i}"] = float(value)
    return scalars


def _local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a SQLite store (MLflow's default is ./mlruns in whatever directory the job runs in);
    a server decides for itself."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.absolute().parent / "mlartifacts" / experiment).as_uri()
    return None
