"""Which model versions a feature store serves: "current", switching it, rolling it back, and
taking old versions out of the online store. Every operation here is registry writes only.

A version's view carries its name in the tag `vae_model_version` and the time it was published in
`vae_published_at`; the "current" feature service carries the version it points at and the one
before it, which is what a rollback returns to.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from feast_embeddings.repo import EmbeddingsRepo
from vae.errors import InputError

log = logging.getLogger("feast_embeddings")

VERSION_TAG = "vae_model_version"
PUBLISHED_TAG = "vae_published_at"
PREVIOUS_TAG = "vae_previous_version"


def stamp_published(view) -> None:
    """Mark a view as published now: keep_online keeps the most recently published versions."""
    view.tags[PUBLISHED_TAG] = datetime.now(UTC).isoformat()


def current_version(repo: EmbeddingsRepo) -> str | None:
    """The model version the 'current' feature service points at, or None before the first publish."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        return repo.store.get_feature_service(repo.current_service, allow_cache=False).tags.get(VERSION_TAG)
    except FeatureServiceNotFoundException:
        return None


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


def switch_current(repo: EmbeddingsRepo, version: str) -> None:
    """Point 'current' at an online version. One registry write: a reader resolves the service once
    per request, so it gets all of its vectors from one version, before or after the switch."""
    view = repo.store.get_feature_view(repo.version_view_name(version))
    if not view.online:
        raise InputError(
            f"model version {version} is not in the online store any more; publish it again "
            f"(vaectl publish --model-version {version})"
        )
    previous = current_version(repo)
    if previous == version:
        return
    repo.store.apply([repo.definitions.current_service(view, previous_version=previous or "")])
    log.info("current: %s -> %s", previous or "(none)", version)


def rollback(repo: EmbeddingsRepo) -> str:
    """Point 'current' back at the version it pointed at before the last switch; returns that version."""
    current = current_version(repo)
    if current is None:
        raise InputError("nothing to roll back: no version has been published as current")
    service = repo.store.get_feature_service(repo.current_service, allow_cache=False)
    previous = service.tags.get(PREVIOUS_TAG)
    if not previous:
        raise InputError(f"current is {current} and has no previous version to roll back to")
    switch_current(repo, previous)
    return previous


def retire_old_versions(store, keep_online: int, current: str | None, make_view) -> list[str]:
    """Take versions beyond the `keep_online` most recently published (current always kept) out of
    the online store; returns them.

    Their feature views stay registered with online=False (re-made by `make_view(version,
    online=False)`), so offline retrieval by version works as before; only the online rows go."""
    views = store.list_feature_views(allow_cache=False)
    online = [v for v in views if VERSION_TAG in v.tags and v.online]
    online.sort(key=lambda v: (v.tags.get(PUBLISHED_TAG, ""), v.tags[VERSION_TAG]), reverse=True)
    others = [v.tags[VERSION_TAG] for v in online if v.tags[VERSION_TAG] != current]
    keep = ({current} if current else set()) | set(others[: keep_online - (1 if current else 0)])
    retired = [v for v in online if v.tags[VERSION_TAG] not in keep]
    if not retired:
        return []
    store.apply([make_view(v.tags[VERSION_TAG], online=False) for v in retired])
    # apply() keeps the online tables of views it updates; dropping them is the provider's infra update.
    store._get_provider().update_infra(
        project=store.project,
        tables_to_delete=retired,
        tables_to_keep=[],
        entities_to_delete=[],
        entities_to_keep=[],
        partial=False,
    )
    names = [v.tags[VERSION_TAG] for v in retired]
    log.info(
        "removed from the %s online store (offline data kept): %s",
        store.config.online_store.type,
        ", ".join(names),
    )
    return names
