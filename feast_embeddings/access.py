"""The feature store's authentication and permissions, applied to callers of the online encoding service:
the same token parser as Feast's servers (OIDC: RS256 tokens checked against the provider's JWKS) and
the same permissions (features.py), so a token means the same thing at `feast serve` and at the service.

    embedding with write-through   WRITE_ONLINE on the version's view (the caller's rows become vectors
                                   in the online store: the publisher's right, not a consumer's)
    embedding without writing      READ_ONLINE on the version's view (what a consumer may do)
    which version is served        DESCRIBE on the view

With `auth: {type: no_auth}` (the laptop default) every call is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from feast.permissions.action import AuthzedAction


@dataclass(frozen=True)
class Refusal:
    status: int  # 401: no or a bad token; 403: a valid token without the permission
    reason: str


class AccessControl:
    def __init__(self, store):
        from feast.permissions.auth_model import OidcAuthConfig

        self.store = store
        config = store.config.auth_config
        self.parser = None
        if isinstance(config, OidcAuthConfig):
            from feast.permissions.auth.oidc_token_parser import OidcTokenParser

            self.parser = OidcTokenParser(config)
        elif config.type != "no_auth":
            from vae.errors import InputError

            raise InputError(
                f"auth type {config.type!r}: the encoding service checks OIDC tokens (or none, no_auth)"
            )

    @property
    def enabled(self) -> bool:
        return self.parser is not None

    async def check(self, authorization: str | None, view_name: str, action: AuthzedAction) -> Refusal | None:
        """None when the caller (its Authorization header) may do `action` on the view, else why not."""
        if self.parser is None:
            return None
        from feast.errors import FeastPermissionError
        from feast.permissions.enforcer import enforce_policy
        from starlette.authentication import AuthenticationError

        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Refusal(401, "missing bearer token (Authorization: Bearer <OIDC access token>)")
        try:
            user = await self.parser.user_details_from_access_token(token.strip())
        except AuthenticationError:
            return Refusal(401, "invalid or expired access token")
        permissions = self.store.list_permissions(allow_cache=True)
        view = self.store.get_feature_view(view_name, allow_registry_cache=True)
        try:
            enforce_policy(permissions, user, [view], [action])
        except FeastPermissionError as error:
            return Refusal(403, f"{user.username}: {str(error).splitlines()[-1]}")
        return None
