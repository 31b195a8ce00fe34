"""deploy/prometheus/: the alert rules and scrape config pass promtool's checks, the rules' unit tests
pass (each alert fires on the series that should trigger it, and only then), and every metric the
rules read is one the jobs push."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed; `make test` installs it (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def test_rules_and_config_pass_promtool_check():
    rules = promtool("check", "rules", "rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 8 rules found" in rules.stdout
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_rule_unit_tests_pass_and_a_wrong_expectation_fails(tmp_path):
    passed = promtool("test", "rules", "rules_test.yml")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    # The same tests with the drift alert expected on the healthy entity: promtool must fail them.
    broken = (
        (PROMETHEUS / "rules_test.yml")
        .read_text()
        .replace("entity: item, model_version: v2", "entity: user, model_version: u1", 1)
    )
    shutil.copy(PROMETHEUS / "rules.yml", tmp_path / "rules.yml")
    (tmp_path / "rules_test.yml").write_text(broken)
    failed = subprocess.run(
        ["promtool", "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert failed.returncode != 0 and "VaeLatentDrift" in failed.stdout + failed.stderr


def test_every_metric_the_rules_read_is_pushed_by_the_jobs():
    rules = (PROMETHEUS / "rules.yml").read_text()
    read = set(re.findall(r"\b(vae_[a-z_]+)\b", rules)) - {"vae_pipeline"}
    sources = "".join(path.read_text() for path in (PROMETHEUS.parents[1] / "ray_jobs").glob("*.py"))
    pushed = {f"vae_{name}" for name in re.findall(r'"([a-z_]+)",\s*\n?\s*[^,]+,\s*\n?\s*"', sources)}
    pushed |= {f"vae_{name}" for name in re.findall(r'\.set\(\s*"([a-z_]+)"', sources)}
    assert read <= pushed, f"rules read metrics no job pushes: {sorted(read - pushed)}"
