"""Which model versions a feature store serves, per entity set: publishing a version, switching
"current", rolling back, and taking old versions out of the online store.

Each operation changes the record of what is published (feast_embeddings.publication) and
applies the Feast objects derived from it, under one lock in the catalog's database: publishers of
several entity sets or versions at once each land whole, and the registry always equals the record.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from feast_embeddings.repo import EmbeddingsRepo
from vae.embeddings.catalog import Properties
from vae.errors import InputError
from vae.killpoints import killpoint
from vae.versions.mlflow_registry import CHALLENGER, CHAMPION, registered_model_name

log = logging.getLogger("feast_embeddings")

REGISTRY_LOCK = "feast-registry"


def registry_lock(repo: EmbeddingsRepo):
    """The lock every change of the publication record and the registry takes: a short lease, renewed
    while held (an apply on a slow registry outlives it), so a publisher killed inside blocks the others
    for 10 s at most."""
    return repo.catalog.lock(REGISTRY_LOCK, ttl_seconds=10, wait_seconds=600, renew=True)


def current_version(repo: EmbeddingsRepo, entity: str = "item") -> str | None:
    """The model version an entity set's "current" service points at, or None before the first publish."""
    return repo.publication(entity).current


def current_features(store, service_name: str = "item_embeddings_current") -> list[str]:
    """The feature references ("view:feature") of the version 'current' points at, read from one
    registry snapshot. Pass these to get_online_features / get_historical_features, not the
    FeatureService object: Feast 0.67 reads a service twice per request (the object passed in, and
    again from the registry) and raises FeatureViewNotFoundException when a publish or rollback
    switches 'current' in between. References name one version's view, which stays in the registry."""
    service = store.get_feature_service(service_name)
    return [
        f"{projection.name_to_use()}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]


def register_version(repo: EmbeddingsRepo, entity: str, version: str) -> None:
    """Make a version's view exist and be online (its online table created) before rows are written, and
    mark it as being written (finish_writing clears the mark) so that no publisher retires it meanwhile."""
    with registry_lock(repo):
        state = repo.publication(entity)
        now = datetime.now(UTC).isoformat()
        updates = {f"online.{version}": "true", f"writing.{version}": now}  # no one retires it meanwhile
        if version not in state.published:
            updates[f"published.{version}"] = now
        repo.update_publication(entity, **updates)
        repo.apply()


def finish_writing(repo: EmbeddingsRepo, entity: str, version: str) -> None:
    """The publish of a version is over: from now on it may be retired. (A publish that crashed leaves the
    mark: the version stays online until a publish of it completes.)"""
    repo.update_publication(entity, **{f"writing.{version}": None})


def record_written(repo: EmbeddingsRepo, entity: str, version: str, mark: str, keys: int) -> None:
    """The table snapshot whose rows are now online (a Delta's mark: the next publish of the version
    writes only batches committed after it), and the version's keys written online so far."""
    repo.update_publication(entity, **{f"written.{version}": mark, f"keys.{version}": str(keys)})


def switch_current(repo: EmbeddingsRepo, entity: str, version: str, rollback: bool = False) -> None:
    """Point 'current' at an online version, and MLflow's @champion with it (first: a switch cut
    short is finished by its re-run, which finds the alias where it was going). One registry write:
    a reader resolves the service once per request, so it gets all of its vectors from one version,
    before or after the switch. A rollback clears `previous` (nothing to toggle back to) and records
    the version it left. Run again after a crash anywhere in it, it finishes the same switch."""
    with registry_lock(repo):
        state = repo.publication(entity)
        if not state.online.get(version):
            raise InputError(
                f"model version {version} is not in the online store any more; publish it again "
                f"(vaectl publish --entity {entity} --model-version {version})"
            )
        move_champion(repo, entity, version)
        if state.current == version:
            if serving_in_registry(repo, entity) != repo.version_view_name(entity, version):
                repo.apply()  # the record was updated, the registry not (a crash in between): finish
            return
        if rollback:
            updates = {"current": version, "previous": None, "rolled_back": state.current}
        else:
            updates = {"current": version, "previous": state.current, "rolled_back": None}
        repo.update_publication(entity, **updates, switching=None)
        killpoint("publish.recorded")
        repo.apply()
    log.info("%s current: %s -> %s", entity, state.current or "(none)", version)


def serving_in_registry(repo: EmbeddingsRepo, entity: str) -> str | None:
    """The view the registry's current service points at (read past the cache), None before one."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        service = repo.store.get_feature_service(repo.current_service_name(entity), allow_cache=False)
    except FeatureServiceNotFoundException:
        return None
    return next((projection.name for projection in service.feature_view_projections), None)


def check_champion(repo: EmbeddingsRepo, entity: str, going_to: str | None = None) -> str | None:
    """Stop when MLflow's @champion is neither Feast's current nor the version a switch is going to
    (someone moved it by hand): which one serves is for a person to say. No alias yet agrees.
    Returns the alias's version."""
    if repo.model_registry is None:
        return None
    state = repo.publication(entity)
    current, name = state.current, registered_model_name(entity)
    champion = repo.model_registry.alias(name, CHAMPION)
    if champion is None or champion in (current, going_to, state.switching):
        return champion
    raise InputError(
        f"MLflow and Feast disagree on {entity}'s serving version: {name}@{CHAMPION} is {champion}, Feast's "
        f"current is {current or '(none)'}; nothing was changed. To serve {champion}: vaectl publish "
        f"--entity {entity} --model-version {champion}; to keep {current}: move @{CHAMPION} back to it "
        f"in MLflow (MlflowClient().set_registered_model_alias('{name}', '{CHAMPION}', <its number>))"
    )


def move_champion(repo: EmbeddingsRepo, entity: str, version: str) -> None:
    """@champion to `version` (registered first if it was trained untracked); @challenger off it. The
    intent is recorded first: a re-run after a crash in between finds the two agreeing."""
    if repo.model_registry is None:
        return
    champion = check_champion(repo, entity, version)
    name = registered_model_name(entity)
    if champion != version:  # (an alias already on it: registered, nothing to move)
        ensure_registered(repo, entity, version)
        if repo.publication(entity).current != version:
            repo.update_publication(entity, switching=version)
        repo.model_registry.set_alias(name, CHAMPION, version)
    if repo.model_registry.alias(name, CHALLENGER) == version:
        repo.model_registry.delete_alias(name, CHALLENGER)


def ensure_registered(repo: EmbeddingsRepo, entity: str, version: str) -> None:
    """A version in MLflow's registry: from its training run when it was tracked, else on its own
    (the folder its embeddings table records)."""
    table = repo.catalog.table(entity, version)
    path = table.properties.get(Properties.MODEL_PATH)
    if not path:
        raise InputError(f"{entity} {version}: its table records no model folder to register in MLflow")
    repo.model_registry.register(registered_model_name(entity), version, path)


def rollback(repo: EmbeddingsRepo, entity: str, to: str | None = None) -> str:
    """Point 'current' back at `to`, or at the version the last switch replaced; returns it. Idempotent:
    run again (after a crash anywhere in it, or by a second person) it finishes the same rollback and
    never toggles back to the version it left."""
    state = repo.publication(entity)
    if state.current is None:
        raise InputError(f"nothing to roll back: no version of '{entity}' has been published as current")
    if to is None and state.previous:
        to = state.previous
    elif to is None and state.rolled_back:
        to = state.current  # this rollback already switched: finish it (the registry may lag the record)
    elif to is None:
        raise InputError(
            f"current is {state.current} and has no previous version to roll back to; name one: "
            f"vaectl publish --entity {entity} --rollback --model-version <version>"
        )
    switch_current(repo, entity, to, rollback=to != state.current)
    return to


def retire_old_versions(
    repo: EmbeddingsRepo, entity: str, keep_online: int, keep: str | None = None
) -> list[str]:
    """Take versions beyond the `keep_online` most recently published (current, previous and `keep`, the
    version just published, always kept; a version a publisher is writing never) out of the online
    store; returns them. Their views stay
    registered with online=False: offline retrieval by version works as before; only the online rows go."""
    with registry_lock(repo):
        state = repo.publication(entity)
        online = [
            v
            for v, is_online in state.online.items()
            if is_online and v in state.written and v not in state.writing
        ]
        online.sort(key=lambda v: (state.published.get(v, ""), v), reverse=True)
        # current and previous (what a rollback returns to) always stay, then the newest others
        pinned = {v for v in (state.current, state.previous, keep) if v}
        others = [v for v in online if v not in pinned]
        keep = pinned | set(others[: max(0, keep_online - len(pinned))])
        retired = [v for v in online if v not in keep]
        if not retired and not state.retiring:
            return []
        # out of service first (views offline), then the rows dropped, then recorded as done: a retire
        # killed between leaves "retiring", and the next one drops what is left
        updates = {f"online.{v}": "retiring" for v in retired}
        updates |= {f"{kind}.{v}": None for v in retired for kind in ("written", "keys")}
        repo.update_publication(entity, **updates)
        repo.apply()
        killpoint("publish.retiring")
        # apply() keeps the online tables of views it updates; dropping them is the provider's infra update.
        dropped = [*state.retiring, *retired]
        views = [repo.store.get_feature_view(repo.version_view_name(entity, v)) for v in dropped]
        repo.store._get_provider().update_infra(
            project=repo.store.project,
            tables_to_delete=views,
            tables_to_keep=[],
            entities_to_delete=[],
            entities_to_keep=[],
            partial=False,
        )
        repo.update_publication(entity, **{f"online.{v}": "false" for v in dropped})
    if retired:
        log.info("%s: removed from the online store (offline data kept): %s", entity, ", ".join(retired))
    return retired
