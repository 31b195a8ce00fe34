"""An OIDC identity provider on 127.0.0.1 without the internet: a discovery document and a JWKS served
from an RSA key generated here, and RS256 tokens minted with PyJWT (what Keycloak or Entra would issue:
`preferred_username`, roles under resource_access.<client_id>.roles)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

CLIENT_ID = "vae-embeddings"


@dataclass
class Provider:
    url: str
    key: rsa.RSAPrivateKey
    key_id: str = "test-key-1"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    def token(self, user: str, roles: list[str], expires_in: float = 300, key=None) -> str:
        """A signed access token; `key` another private key (a forger's), `expires_in` < 0 an expired one."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": user,
            "preferred_username": user,
            "iat": now,
            "exp": now + int(expires_in),
            "resource_access": {CLIENT_ID: {"roles": roles}},
        }
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": self.key_id})


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@contextlib.contextmanager
def oidc_provider() -> Iterator[Provider]:
    key = new_key()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    url = f"http://127.0.0.1:{server.server_port}"
    provider = Provider(url, key)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    server.documents = {  # type: ignore[attr-defined]
        "/.well-known/openid-configuration": {
            "issuer": url,
            "authorization_endpoint": f"{url}/auth",
            "token_endpoint": f"{url}/token",
            "jwks_uri": f"{url}/jwks",
        },
        "/jwks": {"keys": [{**jwk, "kid": provider.key_id, "use": "sig", "alg": "RS256"}]},
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        document = self.server.documents.get(self.path)  # type: ignore[attr-defined]
        body = json.dumps(document).encode()
        self.send_response(200 if document is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass
