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
    assert "train.latent_dim: Input should be greater than 0" in problem("--train", "{latent_dim: 0}")
    assert "train: batch_size 100 is the global batch" in problem(
        "--train", "{batch_size: 100, num_workers: 3}"
    )
    assert "embed.on_bad_rows: Input should be 'fail' or 'quarantine'" in problem(
        "--embed", "{on_bad_rows: skip}"
    )
    assert "publish.writers: Input should be greater than 0" in problem("--publish", "{writers: 0}")
    assert "publish: switch_current are set by the step" in problem("--publish", "{switch_current: false}")
    # what the step passes from its own options: the top level's, never a block's
    assert "embed: in_process_rows are set by the step" in problem("--embed", "{in_process_rows: 5}")
    assert "embed: catalog, model_version are set by the step" in problem(
        "--embed", "{catalog: sqlite:///x.db, model_version: v1}"
    )
    assert "publish: drift_alpha, model_root are set by the step" in problem(
        "--publish", "{drift_alpha: 0.2, model_root: m}"
    )
    blocks = parse_config(
        PipelineConfig,
        ["--data", "d/", "--train", "{epochs: 3}", "--embed", "{on_bad_rows: quarantine}"],
        prog="vaectl pipeline",
    )
    assert blocks.train.model_dump(exclude_unset=True) == {"epochs": 3}, "only what was given overrides"
    assert blocks.embed.on_bad_rows == "quarantine" and blocks.publish.model_dump(exclude_unset=True) == {}
    assert "anomaly_rate_multiple: Input should be greater than 1" in problem("--anomaly-rate-multiple", "1")
    config = parse_config(
        PipelineConfig, ["--data", "s3://lake/items/date=2026-11-23/", "--batch", "2026-11-23"], prog="p"
    )
    assert config.batch == "2026-11-23", "a date-like batch name stays a string"
    assert batch_name(config.data) == "2026-11-23"
    assert batch_name("daily/day-3.parquet") == "day-3" and batch_name("/data/items/") == "items"


def test_derived_run_names_are_those_of_earlier_releases():
    """A run's name is a hash of what it computes: the options of sections marked identity = False never
    enter it, nor mixed-table options of other models. Pinned, so that an option added to the wrong
    section (or a rename) cannot silently stop existing runs from resuming after an upgrade."""
    from vae.training import derived_run_name

    configs = [
        TrainConfig(data="x.parquet"),
        TrainConfig(
            data="x.parquet",
            likelihood="mixed",
            column_types={"a": "categorical"},
            epochs=3,
            num_workers=1,
            batch_size=64,
        ),
        TrainConfig(
            data=["a", "b"],
            vector_column="v",
            image_shape=[1, 8, 8],
            architecture="conv",
            latent_dim=4,
            storage_path="s3://x",
            entity="user",
        ),
    ]
    names = [derived_run_name(config.run_identity(1234567)) for config in configs]
    assert names == ["vae-cdc802f6ced3", "vae-2c6061547373", "vae-70ca5873b9db"]
    placed = TrainConfig(
        data="x.parquet", cpus_per_worker=0.5, max_failures=9, reference_rows=5, experiment="e"
    )
    assert derived_run_name(placed.run_identity(1234567)) == names[0]


def test_help_lists_every_option_once_under_its_section(capsys):
    from ray_jobs.config import EmbedConfig, MonitorConfig, PipelineConfig

    for config_class in (TrainConfig, EmbedConfig, PublishConfig, MonitorConfig, PipelineConfig):
        sections = config_class.sections()
        names = [name for _, section_names in sections for name in section_names]
        assert sorted(names) == sorted(config_class.model_fields), config_class.__name__
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"], "vaectl train")
    shown = capsys.readouterr().out
    mixed, option = shown.index("Mixed tables (likelihood: mixed)"), shown.index("\n  --column-types")
    assert shown.index("Model: architecture and likelihood") < mixed < option
    assert option < shown.index("Objective: the ELBO's weights")
    assert "--data VALUE" in shown and "(required)" in shown


def test_the_configuration_reference_page_is_the_one_the_configs_generate():
    """docs/configuration.md is generated (make docs); a change to an option must regenerate it."""
    from pathlib import Path

    from ray_jobs.reference import reference

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"
    assert "| `column_types` |" in page.read_text() and "## vaectl pipeline" in page.read_text()


def test_every_job_checks_the_entity_name_before_it_runs():
    from ray_jobs.config import EmbedConfig, PipelineConfig, PublishConfig

    for config, extra in (
        (PublishConfig, []),
        (EmbedConfig, ["--data", "/d"]),
        (PipelineConfig, ["--data", "/d"]),
    ):
        with pytest.raises(InputError, match=r"entity: entity 'Item-Set': use lower-case letters"):
            parse_config(config, ["--entity", "Item-Set", *extra], prog="vaectl")
