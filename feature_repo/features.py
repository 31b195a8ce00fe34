# Feature definitions for VAE embeddings: the shape of every embedding set's objects, declared once.
# Which entity sets, published model versions and "current" versions exist is read from the
# embeddings catalog named in feature_store.yaml (vae_embeddings), so `feast apply` here declares
# exactly what `vaectl publish` registered, and deletes nothing.
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, ValueType
from feast.feast_object import ALL_RESOURCE_TYPES
from feast.permissions.action import AuthzedAction
from feast.permissions.permission import Permission
from feast.permissions.policy import RoleBasedPolicy
from feast.types import Array, Bool, Float32, Int64, String

from feast_embeddings.repo import PREVIOUS_TAG, PUBLISHED_TAG, VERSION_TAG, declare_published
from vae.embeddings.names import identifier

KEY_TYPES = {"int64": (ValueType.INT64, Int64), "string": (ValueType.STRING, String)}


def entity(name: str, join_key: str, key_type: str) -> Entity:
    """An embedding set's entity: what its vectors describe, looked up by the embeddings' key column."""
    return Entity(
        name=name, join_keys=[join_key], value_type=KEY_TYPES[key_type][0], description=f"An embedded {name}"
    )


def embedding_fields(join_key: str, key_type: str) -> list[Field]:
    """The columns every embeddings view serves; `model_version` says which model made each vector."""
    return [
        Field(name=join_key, dtype=KEY_TYPES[key_type][1]),
        Field(name="latent", dtype=Array(Float32), description="VAE posterior mean"),
        Field(
            name="anomaly_score", dtype=Float32, description="negative ELBO in nats; higher = more unusual"
        ),
        Field(name="model_version", dtype=String, description="model version that produced the vector"),
        Field(
            name="is_anomaly",
            dtype=Bool,
            description="anomaly_score above the version's calibrated threshold",
        ),
        Field(
            name="top_columns",
            dtype=Array(String),
            description="the input columns that make the row unusual, most first (tables)",
        ),
        Field(name="top_shares", dtype=Array(Float32), description="each top column's share of the surprise"),
    ]


def version_view_name(entity_name: str, model_version: str) -> str:
    """The view that pins one model version, e.g. item_embeddings_20261123T203831Z_450da0be."""
    return f"{entity_name}_embeddings_" + identifier(model_version)


def version_view(owner: Entity, model_version: str, source, online: bool, published_at: str) -> FeatureView:
    """One model version's vectors: online while kept (keep_online), offline always. Pin a version by it."""
    return FeatureView(
        name=version_view_name(owner.name, model_version),
        entities=[owner],
        ttl=timedelta(0),  # vectors do not expire; a newer one replaces them
        schema=embedding_fields(owner.join_key, _key_type(owner)),
        source=source,
        online=online,
        tags={VERSION_TAG: model_version, PUBLISHED_TAG: published_at},
    )


def current_service_name(entity_name: str) -> str:
    """The feature service consumers read to follow an entity set's current version."""
    return f"{entity_name}_embeddings_current"


def current_service(view: FeatureView, entity_name: str, previous_version: str) -> FeatureService:
    """'current' -> one version's view. Re-declaring it is the atomic switch: one registry write."""
    tags = {VERSION_TAG: view.tags[VERSION_TAG], PREVIOUS_TAG: previous_version}
    return FeatureService(name=current_service_name(entity_name), features=[view], tags=tags)


# Vector search (`vaectl publish --vector-search`): a version's vectors also go to the Milvus Lite
# store of the repo in vector_search/, indexed for `retrieve_online_documents_v2`.
def vector_view_name(entity_name: str, model_version: str) -> str:
    """The searchable view of one model version, e.g. item_latents_20261123T203831Z_450da0be."""
    return f"{entity_name}_latents_" + identifier(model_version)


def vector_view(owner: Entity, model_version: str, source, online: bool = True) -> FeatureView:
    """One version's vectors, the latent as the vector-indexed field (L2: the latent space is Gaussian)."""
    latent = Field(
        name="latent",
        dtype=Array(Float32),
        vector_index=True,
        vector_search_metric="L2",
        description="VAE posterior mean",
    )
    key = Field(name=owner.join_key, dtype=KEY_TYPES[_key_type(owner)][1])
    return FeatureView(
        name=vector_view_name(owner.name, model_version),
        entities=[owner],
        ttl=timedelta(0),
        schema=[
            key,
            latent,
            Field(name="anomaly_score", dtype=Float32),
            Field(name="model_version", dtype=String),
        ],
        source=source,
        online=online,
        tags={VERSION_TAG: model_version},
    )


# Who may do what through Feast's servers (`feast serve`, the registry and offline servers), by the
# roles in a caller's OIDC token (resource_access.<client_id>.roles, or roles). Enforced only where
# feature_store.yaml sets an auth type (deploy/feature_store.yaml: oidc); the laptop default is no_auth.
CONSUMER_ROLE, PUBLISHER_ROLE = "vae-consumer", "vae-publisher"
READ_ACTIONS = [AuthzedAction.DESCRIBE, AuthzedAction.READ_ONLINE, AuthzedAction.READ_OFFLINE]
WRITE_ACTIONS = [a for a in AuthzedAction if a not in READ_ACTIONS]


def permissions() -> list[Permission]:
    """Consumers (and the publisher) read and describe; only the publisher writes, applies or deletes.
    The two never match the same request (Feast requires every matching permission to agree)."""
    return [
        Permission(
            name="embeddings_read",
            types=ALL_RESOURCE_TYPES,
            policy=RoleBasedPolicy(roles=[CONSUMER_ROLE, PUBLISHER_ROLE]),
            actions=READ_ACTIONS,
        ),
        Permission(
            name="embeddings_write",
            types=ALL_RESOURCE_TYPES,
            policy=RoleBasedPolicy(roles=[PUBLISHER_ROLE]),
            actions=WRITE_ACTIONS,
        ),
    ]


def _key_type(owner: Entity) -> str:
    return "int64" if owner.value_type == ValueType.INT64 else "string"


# Everything published and the permissions, declared from the catalog with the factories above
# (module-level objects are what `feast apply` collects).
globals().update(declare_published(globals()))
