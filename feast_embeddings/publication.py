"""Which model versions of an entity set the feature store serves: the publication record, kept as
properties of the entity set's namespace in the embeddings catalog (one place every publisher and
reader shares, updated in the catalog's own transactions).

    current             the version the <entity>_embeddings_current feature service points at
    previous            the one it pointed at before the last switch (what a rollback returns to);
                        cleared by a rollback, so a second rollback never toggles back
    rolled_back         the version the last rollback moved away from (until the next switch)
    switching           a switch of current begun (MLflow's @champion moved first), not finished
    published.<v>       when v was first published (ISO time); its view stays registered for ever
    online.<v>          "true" while v's view is online (the keep_online newest), "false" after;
                        "retiring" between the record and the drop of its online rows (a retire cut
                        short: the next retire drops them)
    written.<v>         the table snapshot whose rows are online, as <snapshot id>@<sequence number>:
                        the next publish writes the batches committed after it
    keys.<v>            the keys of v written online so far (counted on its first publish, then added to)
    indexed.<v>         the same for the rows in the vector-search index
    writing.<v>         a publish of v is under way (since the ISO time): no other publisher retires v

The Feast objects (views, the current service) are derived from this record (feast_embeddings.repo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vae.embeddings.catalog import EmbeddingsCatalog
from vae.errors import InputError
from vae.versions.mlflow_registry import resolve_model_version

CURRENT, PREVIOUS, SWITCHING, ROLLED_BACK = "current", "previous", "switching", "rolled_back"
PER_VERSION = ("published", "online", "written", "indexed", "writing", "keys")  # keys <kind>.<version>


@dataclass
class Publication:
    """The record of one entity set (empty for one never published)."""

    current: str | None = None
    previous: str | None = None
    switching: str | None = None
    rolled_back: str | None = None
    published: dict[str, str] = field(default_factory=dict)  # version -> first published at (ISO)
    online: dict[str, bool] = field(default_factory=dict)
    retiring: list[str] = field(default_factory=list)  # out of service, their online rows not yet dropped
    written: dict[str, str] = field(default_factory=dict)  # version -> the mark written online
    indexed: dict[str, str] = field(default_factory=dict)  # version -> the mark in the vector index
    writing: dict[str, str] = field(default_factory=dict)  # version -> when a publish of it began (ISO)
    keys: dict[str, int] = field(default_factory=dict)  # version -> its keys written online so far

    @classmethod
    def read(cls, catalog: EmbeddingsCatalog, entity: str) -> Publication:
        properties = catalog.entity_properties(entity)
        state = cls(
            current=properties.get(CURRENT) or None,
            previous=properties.get(PREVIOUS) or None,
            switching=properties.get(SWITCHING) or None,
            rolled_back=properties.get(ROLLED_BACK) or None,
        )
        for key, value in properties.items():
            kind, _, version = key.partition(".")
            if kind in ("published", "writing") and version:
                getattr(state, kind)[version] = value
            elif kind == "online" and version:
                state.online[version] = value == "true"
                if value == "retiring":
                    state.retiring.append(version)
            elif kind in ("written", "indexed") and version:
                getattr(state, kind)[version] = value
            elif kind == "keys" and version:
                state.keys[version] = int(value)
        return state


def update_publication(catalog: EmbeddingsCatalog, entity: str, **updates: str | None) -> None:
    """Set record entries, e.g. current=v, **{"online.v": "true"}; None removes one."""
    known = (CURRENT, PREVIOUS, SWITCHING, ROLLED_BACK, *PER_VERSION)
    unknown = [key for key in updates if key.partition(".")[0] not in known]
    if unknown:
        raise ValueError(f"not publication keys: {unknown}")
    catalog.update_entity_properties(entity, updates)


def resolve_version(
    catalog: EmbeddingsCatalog, entity: str, version: str, tracking_uri: str | None = None, fix: str = ""
) -> str:
    """A version name, with 'current' (the published one), 'latest' (the newest embedded) and MLflow's
    models:/ URIs (in the registry at tracking_uri; `fix` says where it is configured) resolved."""
    _, version = resolve_model_version(version, tracking_uri, fix)
    if version != "current":
        return catalog.resolve(entity, version)
    current = Publication.read(catalog, entity).current
    if current is None:
        raise InputError(f"entity '{entity}' has no current version yet; publish one (vaectl publish)")
    return current
