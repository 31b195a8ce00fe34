# Feature definitions for VAE embeddings. `vaectl publish` registers them (as `feast apply` would),
# adds one feature view per published model version and points the "current" service at one.
import os
import re
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Float32, Int64, String

# Where the embed job writes: <root>/<model_version>/part-*.parquet, a local path or an s3:// URL.
# DuckDB resolves relative paths against the working directory, so a local path is made absolute.
EMBEDDINGS_ROOT = os.environ.get("VAE_EMBEDDINGS_PATH", str(Path(__file__).parent / "data" / "embeddings"))
if "://" not in EMBEDDINGS_ROOT:
    EMBEDDINGS_ROOT = str(Path(EMBEDDINGS_ROOT).absolute())
# The S3 endpoint the publishing environment used (unset on AWS; set for S3-compatible stores).
S3_ENDPOINT = os.environ.get("AWS_ENDPOINT_URL") if EMBEDDINGS_ROOT.startswith("s3://") else None

# The entity: what a vector describes, looked up by its join key (the dataset's key column).
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="An embedded item")

# The columns every embeddings view serves; `model_version` says which model made each vector.
EMBEDDING_FIELDS = [
    Field(name="item_id", dtype=Int64),
    Field(name="latent", dtype=Array(Float32), description="VAE posterior mean"),
    Field(name="anomaly_score", dtype=Float32, description="negative ELBO in nats; higher = more unusual"),
    Field(name="model_version", dtype=String, description="model version that produced the vector"),
    Field(name="is_anomaly", dtype=Bool, description="anomaly_score above the model version's calibrated threshold"),
]

# History across versions (offline only): every committed version's embeddings, so a point-in-time
# join returns, at each timestamp, the newest vector that existed then, whichever version made it.
item_embeddings_source = FileSource(
    name="item_embeddings_source",
    path=f"{EMBEDDINGS_ROOT}/*/*.parquet",
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    s3_endpoint_override=S3_ENDPOINT,
)
item_embeddings = FeatureView(
    name="item_embeddings",
    entities=[item],
    ttl=timedelta(0),  # vectors do not expire; a newer one replaces them
    schema=EMBEDDING_FIELDS,
    source=item_embeddings_source,
    online=False,
)

# The feature service consumers read to follow the latest published version ("current").
CURRENT_SERVICE = "item_embeddings_current"


def version_view_name(model_version: str) -> str:
    """The feature view that pins one model version, e.g. item_embeddings_20261123T203831Z_450da0be."""
    return "item_embeddings_" + re.sub(r"[^0-9A-Za-z_]", "_", model_version)


def version_view(model_version: str, online: bool = True) -> FeatureView:
    """One model version's vectors, online (while kept) and offline (always): pin a version by this view."""
    source = FileSource(
        name=version_view_name(model_version) + "_source",
        path=f"{EMBEDDINGS_ROOT}/{model_version}/*.parquet",
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        s3_endpoint_override=S3_ENDPOINT,
    )
    return FeatureView(
        name=version_view_name(model_version),
        entities=[item],
        ttl=timedelta(0),
        schema=EMBEDDING_FIELDS,
        source=source,
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


def vector_view(model_version: str, online: bool = True) -> FeatureView:
    """One model version's vectors with the latent as the vector-indexed field (L2, as the latent space is Gaussian)."""
    view = version_view(model_version, online)
    return FeatureView(
        name=vector_view_name(model_version),
        entities=[item],
        ttl=timedelta(0),
        schema=[
            Field(name="item_id", dtype=Int64),
            Field(name="latent", dtype=Array(Float32), vector_index=True, vector_search_metric="L2", description="VAE posterior mean"),
            Field(name="anomaly_score", dtype=Float32),
            Field(name="model_version", dtype=String),
        ],
        source=view.batch_source,
        online=online,
        tags={"vae_model_version": model_version},
    )
