# Feature definitions for VAE embeddings: declarations only. `vaectl publish` (feast_embeddings)
# registers them, adds one feature view per published model version and points "current" at one;
# it passes each view the location of its embeddings (<root>/<model_version>/*.parquet).
import re
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Float32, Int64, String

# The entity: what a vector describes, looked up by its join key (the embeddings' key column).
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="An embedded item")

# The columns every embeddings view serves; `model_version` says which model made each vector.
EMBEDDING_FIELDS = [
    Field(name="item_id", dtype=Int64),
    Field(name="latent", dtype=Array(Float32), description="VAE posterior mean"),
    Field(name="anomaly_score", dtype=Float32, description="negative ELBO in nats; higher = more unusual"),
    Field(name="model_version", dtype=String, description="model version that produced the vector"),
    Field(
        name="is_anomaly", dtype=Bool, description="anomaly_score above the version's calibrated threshold"
    ),
]

# The feature service consumers read to follow the latest published version ("current").
CURRENT_SERVICE = "item_embeddings_current"


def embeddings_source(name: str, path: str, s3_endpoint: str | None = None) -> FileSource:
    """Embedding files (a glob, absolute or s3://: DuckDB resolves relative paths elsewhere)."""
    return FileSource(
        name=name,
        path=path,
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        s3_endpoint_override=s3_endpoint,
    )


def history_view(path: str, s3_endpoint: str | None = None) -> FeatureView:
    """Every committed version's embeddings (offline only): a point-in-time join returns, at each
    timestamp, the newest vector that existed then, whichever version made it."""
    return FeatureView(
        name="item_embeddings",
        entities=[item],
        ttl=timedelta(0),  # vectors do not expire; a newer one replaces them
        schema=EMBEDDING_FIELDS,
        source=embeddings_source("item_embeddings_source", path, s3_endpoint),
        online=False,
    )


def version_view_name(model_version: str) -> str:
    """The feature view that pins one model version, e.g. item_embeddings_20261123T203831Z_450da0be."""
    return "item_embeddings_" + re.sub(r"[^0-9A-Za-z_]", "_", model_version)


def version_view(
    model_version: str, path: str, online: bool = True, s3_endpoint: str | None = None
) -> FeatureView:
    """One model version's vectors, online (while kept) and offline (always): pin a version by this view."""
    name = version_view_name(model_version)
    return FeatureView(
        name=name,
        entities=[item],
        ttl=timedelta(0),
        schema=EMBEDDING_FIELDS,
        source=embeddings_source(name + "_source", path, s3_endpoint),
        online=online,
        tags={"vae_model_version": model_version},
    )


def current_service(view: FeatureView, previous_version: str = "") -> FeatureService:
    """'current' -> one version's view. Re-applying it is the atomic switch: one registry write."""
    return FeatureService(
        name=CURRENT_SERVICE,
        features=[view],
        tags={"vae_model_version": view.tags["vae_model_version"], "vae_previous_version": previous_version},
    )


# Vector search (`vaectl publish --vector-search`): a version's vectors also go to the Milvus Lite
# store of the repo in vector_search/, indexed for `retrieve_online_documents_v2`. Same source.
def vector_view_name(model_version: str) -> str:
    """The searchable view of one model version, e.g. item_latents_20261123T203831Z_450da0be."""
    return "item_latents_" + re.sub(r"[^0-9A-Za-z_]", "_", model_version)


def vector_view(
    model_version: str, path: str, online: bool = True, s3_endpoint: str | None = None
) -> FeatureView:
    """One model version's vectors with the latent as the vector-indexed field (L2: the latent space is
    Gaussian)."""
    name = vector_view_name(model_version)
    latent = Field(
        name="latent",
        dtype=Array(Float32),
        vector_index=True,
        vector_search_metric="L2",
        description="VAE posterior mean",
    )
    return FeatureView(
        name=name,
        entities=[item],
        ttl=timedelta(0),
        schema=[
            Field(name="item_id", dtype=Int64),
            latent,
            Field(name="anomaly_score", dtype=Float32),
            Field(name="model_version", dtype=String),
        ],
        source=embeddings_source(version_view_name(model_version) + "_source", path, s3_endpoint),
        online=online,
        tags={"vae_model_version": model_version},
    )


# What `feast apply` in this directory registers: the entity and the history over the repo's own
# data/embeddings (publish registers the same view over its configured embeddings root).
item_embeddings = history_view(
    str(Path(__file__).parent.absolute() / "data" / "embeddings" / "*" / "*.parquet")
)
