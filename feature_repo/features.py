# Feature definitions for VAE embeddings. `feast apply` (or `vaectl publish`) registers them.
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Float32, Int64, String

# Where the embed job writes: <root>/<model_version>/*.parquet. DuckDB resolves relative paths
# against the working directory, so the path is made absolute here.
EMBEDDINGS_ROOT = Path(os.environ.get("VAE_EMBEDDINGS_PATH", Path(__file__).parent / "data" / "embeddings")).absolute()

# The entity: what a vector describes, looked up by its join key (the dataset's key column).
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="An embedded item")

# The offline source: every committed model version's embeddings, one directory per version.
item_embeddings_source = FileSource(
    name="item_embeddings_source",
    path=str(EMBEDDINGS_ROOT / "*" / "*.parquet"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
)

# The feature view: the posterior mean, its anomaly score, and the model version that made them.
item_embeddings = FeatureView(
    name="item_embeddings",
    entities=[item],
    ttl=timedelta(0),  # vectors do not expire; a new model version replaces them
    schema=[
        Field(name="item_id", dtype=Int64),
        Field(name="latent", dtype=Array(Float32), description="VAE posterior mean"),
        Field(name="anomaly_score", dtype=Float32, description="negative ELBO in nats; higher = more unusual"),
        Field(name="model_version", dtype=String, description="model version that produced the vector"),
    ],
    source=item_embeddings_source,
    online=True,
)
