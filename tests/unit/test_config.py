"""Job configs: defaults < YAML < flags, typed, unknown keys refused."""

import pytest
from helpers.cli import flags

from ray_jobs.config import PublishConfig, TrainConfig, parse_config
from vae import InputError


def test_yaml_then_flags_override(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text(
        "data: digits.parquet\nvector_column: pixels\nlatent_dim: 8\nhidden_dims: [64, 32]\nepochs: 3\n"
    )
    config = parse_config(
        TrainConfig,
        [
            *flags(config=str(config_file), epochs="7", gpus_per_worker="1", worker_resources="{trainer: 1}"),
        ],
        "vaectl train",
    )
    assert config.data == "digits.parquet" and config.latent_dim == 8 and config.hidden_dims == [64, 32]
    assert (
        config.epochs == 7 and config.gpus_per_worker == 1.0 and config.worker_resources == {"trainer": 1.0}
    )
    assert config.batch_size == TrainConfig.model_fields["batch_size"].default


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(InputError, match="latent_size"):
        parse_config(
            TrainConfig, ["--data", "x", "--config", _write(tmp_path, "latent_size: 3\n")], "vaectl train"
        )
    with pytest.raises(InputError, match="likelihood"):
        parse_config(TrainConfig, ["--data", "x", "--likelihood", "poisson"], "vaectl train")
    with pytest.raises(InputError, match="data"):
        parse_config(TrainConfig, [], "vaectl train")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_boolean_options_are_switches():
    assert parse_config(PublishConfig, ["--rollback"], "vaectl publish").rollback is True
    config = parse_config(
        PublishConfig,
        ["--vector-search", "--switch-current", "false", "--keep-online", "3"],
        "vaectl publish",
    )
    assert config.vector_search is True and config.switch_current is False and config.keep_online == 3


def test_the_global_batch_must_split_evenly_across_the_workers():
    with pytest.raises(
        InputError, match=r"batch_size 128 is the global batch .* 3 workers \(e\.g\. 126, 129\)"
    ):
        parse_config(TrainConfig, ["--data", "x", "--num-workers", "3"], "vaectl train")
    config = parse_config(TrainConfig, ["--data", "x", "--num-workers", "4", "--batch-size", "256"], "t")
    assert config.worker_batch_size() == 64


def test_pipeline_blocks_are_checked_by_the_jobs_own_configs(tmp_path):
    from ray_jobs.config import PipelineConfig
    from ray_jobs.pipeline import batch_name

    def problem(*argv: str) -> str:
        with pytest.raises(InputError) as error:
            parse_config(PipelineConfig, ["--data", "d/", *argv], prog="vaectl pipeline")
        return str(error.value)

    assert "train: data, init_from are set by the step" in problem("--train", "{data: x, init_from: v1}")
    assert "train: latent_dim: Input should be greater than 0" in problem("--train", "{latent_dim: 0}")
    assert "embed: on_bad_rows: Input should be 'fail' or 'quarantine'" in problem(
        "--embed", "{on_bad_rows: skip}"
    )
    assert "publish: writers: Input should be greater than 0" in problem("--publish", "{writers: 0}")
    assert "publish: switch_current are set by the step" in problem("--publish", "{switch_current: false}")
    assert "anomaly_rate_multiple: Input should be greater than 1" in problem("--anomaly-rate-multiple", "1")
    config = parse_config(
        PipelineConfig, ["--data", "s3://lake/items/date=2026-11-23/", "--batch", "2026-11-23"], prog="p"
    )
    assert config.batch == "2026-11-23", "a date-like batch name stays a string"
    assert batch_name(config.data) == "2026-11-23"
    assert batch_name("daily/day-3.parquet") == "day-3" and batch_name("/data/items/") == "items"
