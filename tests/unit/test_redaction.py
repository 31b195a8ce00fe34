"""Credentials are redacted in every form they reach a message in, and a catalog URI holding one is
refused wherever it is given."""

import logging

import pytest

from vae.errors import InputError
from vae.secrets import holds_credentials, redact, redact_logs


@pytest.mark.parametrize(
    "text, secret",
    [
        ("postgresql+psycopg2://vae:pg-secret@db:5432/catalog", "pg-secret"),
        ("postgresql://:pg-secret@db/catalog", "pg-secret"),
        ("postgresql://vae@db/catalog?sslmode=require&password=pg-secret", "pg-secret"),
        ("redis.internal:6379,password=redis-secret,ssl=true", "redis-secret"),
        ("http://publisher:mlflow-secret@mlflow:5000/api", "mlflow-secret"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=0123abcd", "0123abcd"),
        ('{"client_secret": "oidc-secret", "user": "x"}', "oidc-secret"),
        ("token=jwt.payload.sig&x=1", "jwt.payload.sig"),
    ],
)
def test_every_form_of_credential_is_masked(text, secret):
    assert holds_credentials(text)
    redacted = redact(text)
    assert secret not in redacted and "***" in redacted
    assert text.split(secret)[0].startswith(redacted.split("***")[0])  # what precedes it is kept


def test_plain_locations_are_left_alone():
    for text in ("s3://bucket/vae/warehouse", "http://127.0.0.1:5000", "sqlite:///data/catalog.db", "a: b"):
        assert not holds_credentials(text) and redact(text) == text


def test_the_environments_credentials_are_masked_wherever_they_show(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-1")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "127.0.0.1:6379,password=redis-env-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:mlflow-env-secret@127.0.0.1:5000")
    message = "refused with aws-secret-value-1; auth redis-env-secret failed; mlflow-env-secret"
    assert redact(message) == "refused with ***; auth *** failed; ***"


def test_log_records_are_redacted_for_every_logger(caplog):
    redact_logs()
    redact_logs()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("some.library").info("connecting to %s", "postgresql://u:pw-in-log@h/db")
        try:
            raise RuntimeError("failed: redis:6379,password=pw-in-trace")
        except RuntimeError:
            logging.getLogger("other").exception("step failed")
    text = caplog.text
    assert "pw-in-log" not in text and "pw-in-trace" not in text
    assert "postgresql://u:***@h/db" in text and "password=***" in text


@pytest.mark.parametrize(
    "uri", ["postgresql://vae:pw@db/c", "postgresql://:pw@db/c", "postgresql://vae@db/c?password=pw"]
)
def test_a_catalog_uri_with_a_password_is_refused_by_option_and_by_file(uri, tmp_path):
    from feast_embeddings.settings import StoreSettings
    from vae.embeddings.catalog import EmbeddingsCatalog

    with pytest.raises(InputError, match="holds a password or token") as refused:
        EmbeddingsCatalog(uri, str(tmp_path / "warehouse"))  # what --catalog opens
    assert ":pw@" not in str(refused.value) and "=pw" not in str(refused.value)
    store = tmp_path / "feature_store.yaml"
    store.write_text(f"project: p\nvae_embeddings:\n    catalog: {uri}\n    warehouse: {tmp_path}/w\n")
    with pytest.raises(InputError, match="the catalog URI holds a password"):
        StoreSettings.read(store).open_catalog()


def test_the_decision_log_stores_no_credential(tmp_path):
    """The pipeline's decisions name data, reports and errors: what they carry is redacted when written."""
    from vae.embeddings.catalog import EmbeddingsCatalog
    from vae.pipeline.decisions import Decision, DecisionLog

    catalog = EmbeddingsCatalog(f"sqlite:///{tmp_path / 'catalog.db'}", str(tmp_path / "warehouse"))
    failed = "online store: redis.internal:6379,password=decision-secret refused"
    detail = {"report": "http://u:decision-secret@reports/day-1.html", "rows": 10}
    DecisionLog(catalog, "item").append([Decision("d1", "embedded", "v1", failed, detail)], step="d1")
    (stored,) = DecisionLog(catalog, "item").read()
    assert stored.reason == "online store: redis.internal:6379,password=*** refused"
    assert stored.detail == {"report": "http://u:***@reports/day-1.html", "rows": 10}
    stored_files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"decision-secret" not in stored_files
