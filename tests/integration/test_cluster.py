"""The pipeline as Ray jobs on a real two-node cluster: `ray start --head` (CPU only, as the
cluster.yaml head) plus a node joined with `ray start --address` that declares one GPU and
Ray's accelerator_type:A10G resource (this machine has no GPU: the GPU is a Ray resource here,
and the encoder falls back to CPU with a warning). Jobs go through `vaectl submit`, which
uses JobSubmissionClient with Ray's token authentication."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import flags
from helpers.local_cluster import local_cluster

from feast_embeddings.settings import StoreSettings

REPO = Path(__file__).resolve().parents[2]
GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:A10G": 1}}


def test_submit_checks_the_job_and_the_server_before_anything_runs(tmp_path, monkeypatch, capsys):
    """No cluster needed: bad job options, a missing --env variable and an unreachable job server
    are each one clear error, found before any upload."""
    from helpers.servers import free_port

    from ray_jobs.submit import main
    from vae import InputError

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SystemExit) as exited:
        main(["embed", "--address", address, "--data", "x.parquet", "--no-such-option", "3"])
    # the job's parser
    assert exited.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(InputError, match="batch_size: Input should be greater than 0"):
        main(["embed", "--address", address, "--data", "x.parquet", "--batch-size", "0"])
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(InputError, match="--env NOT_SET_HERE: not set"):
        main(["embed", "--address", address, "--data", "x.parquet", "--env", "NOT_SET_HERE"])
    with pytest.raises(
        InputError, match=f"cannot reach a Ray job server at {address}.*ray dashboard cluster.yaml"
    ):
        main(["embed", "--address", address, "--data", "x.parquet"])
    (tmp_path / "env.yaml").write_text("- not a mapping\n")
    with pytest.raises(InputError, match="expected a mapping"):
        main(
            [
                "embed",
                *flags(address=address, runtime_env=str(tmp_path / "env.yaml"), data="x.parquet"),
            ]
        )


@pytest.mark.timeout(900)
def test_train_embed_publish_as_ray_jobs_on_a_two_node_cluster(digits_parquet, feature_repo, tmp_path):
    from feast import FeatureStore
    from ray.job_submission import JobStatus, JobSubmissionClient

    from feast_embeddings import current_features

    models = tmp_path / "models"
    with local_cluster(tmp_path, head_cpus=1, nodes=[GPU_NODE]) as cluster:
        (gpu_node,) = [n["node_id"] for n in cluster.nodes() if n["resources_total"].get("GPU", 0) >= 1]

        def submit(job: str, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
            command = [
                sys.executable,
                "-m",
                "ray_jobs.cli",
                "submit",
                job,
                *flags(address=cluster.address, working_dir=str(REPO), python=sys.executable),
                *options,
            ]
            started = time.monotonic()
            result = subprocess.run(
                command, check=False, env=env or cluster.env, capture_output=True, text=True, timeout=600
            )
            print(f"{job}: {time.monotonic() - started:.1f}s")  # shown with a failure
            return result

        train = submit(
            "train",
            *flags(data=str(digits_parquet), vector_column="pixels", image_shape="[1, 8, 8]"),
            # the demo's model and settings: 3 epochs leave enough active units for the publish gate
            *flags(
                model_root=str(models),
                storage_path=str(tmp_path / "ray_results"),
                epochs="3",
                batch_size="32",
                kl_warmup_epochs="0",
                learning_rate="0.003",
                num_workers="2",
                accelerator_type="A10G",
                iw_samples="0",
                report_rows="0",
            ),
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        # the driver's log, streamed here
        assert "model version" in train.stdout and "saved under" in train.stdout
        assert "SUCCEEDED" in train.stderr
        # Placement: both DDP workers on the node with the accelerator, although the head had a free CPU.
        workers = cluster.actors("RayTrainWorker")
        assert len(workers) == 2 and {w["node_id"] for w in workers} == {gpu_node}
        assert all(
            any(name.startswith("accelerator_type:A10G") for name in w["required_resources"]) for w in workers
        ), [w["required_resources"] for w in workers]

        embed = submit(
            "embed",
            *flags(
                data=str(digits_parquet),
                model_root=str(models),
                feature_store_yaml=str(feature_repo / "feature_store.yaml"),
            ),
        )
        assert embed.returncode == 0, embed.stdout[-3000:] + embed.stderr[-3000:]
        # The cluster has a GPU: the encoders asked for one and ran where it is.
        encoders = cluster.actors("EncoderActor")
        assert encoders and all(e["node_id"] == gpu_node for e in encoders)
        assert all(any(name.startswith("GPU") for name in e["required_resources"]) for e in encoders), [
            e["required_resources"] for e in encoders
        ]

        publish = submit(
            "publish",
            *flags(
                model_root=str(models),
                feature_repo=str(feature_repo),
                verify_rows="64",
            ),
        )
        assert publish.returncode == 0, publish.stdout[-3000:] + publish.stderr[-3000:]

        # Bad input fails the job with the one-line error and the job's own exit code.
        bad = submit("embed", "--data", str(tmp_path / "missing.parquet"), "--model-root", str(models))
        assert bad.returncode == 2 and "missing.parquet: no such file or directory" in bad.stdout
        assert "FAILED" in bad.stderr
        # A client with another token is refused, and told what to do.
        refused = submit("publish", env={**cluster.env, "RAY_AUTH_TOKEN": "0" * 64})
        assert refused.returncode == 2 and "refused this client's token" in refused.stderr

        jobs = JobSubmissionClient(cluster.address, headers=cluster.headers).list_jobs()
        statuses = sorted((job.metadata.get("vaectl_job"), job.status) for job in jobs)
        assert statuses == [
            ("embed", JobStatus.FAILED),
            ("embed", JobStatus.SUCCEEDED),
            ("publish", JobStatus.SUCCEEDED),
            ("train", JobStatus.SUCCEEDED),
        ]

    # The vectors, read back through Feast's online API, are the embed job's.
    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    (version,) = catalog.versions("item")
    table = catalog.read(catalog.table("item", version), ["item_id", "latent", "model_version"])
    store = FeatureStore(repo_path=str(feature_repo))
    keys = table.column("item_id").to_pylist()[:50]
    online = store.get_online_features(
        features=current_features(store), entity_rows=[{"item_id": k} for k in keys]
    ).to_dict()
    expected = dict(zip(table.column("item_id").to_pylist(), table.column("latent").to_pylist(), strict=True))
    assert online["item_id"] == keys and set(online["model_version"]) == {version}
    np.testing.assert_array_equal(
        np.array(online["latent"], dtype=np.float32), np.array([expected[k] for k in keys], dtype=np.float32)
    )
