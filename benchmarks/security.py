"""What the security work costs, each against the plain path in the same run (medians of --repeats):

load   load_model_version of a folder checked file by file against an ed25519-signed manifest, against
       the same folder without a manifest (model.json's checksums only, as before manifests)
auth   one caller check of the encoding service (feast_embeddings.access: Feast's OIDC parser, RS256
       against the cached JWKS, and enforce_policy over features.py's permissions), against encoding
       one row in process (what the request costs without it)
logs   log records through the redacting record factory, against the plain one

    python -m benchmarks.security [--dims 64 784] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, save, untrained_version

REPO = Path(__file__).resolve().parent.parent


def per_call(fn, calls: int) -> float:
    """Seconds per call, the median of five rounds of `calls` calls."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls)
    return statistics.median(rounds)


def ed25519_keys(directory: Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "signing.pem").write_bytes(private)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return str(directory / "signing.pem"), public.decode()


def load_cost(work: Path, dim: int, calls: int) -> dict:
    from vae import load_model_version
    from vae.versions import manifest

    signing, public = ed25519_keys(work)
    os.environ[manifest.SIGNING_ENV] = signing
    version = untrained_version(work / f"signed-{dim}", dim)
    del os.environ[manifest.SIGNING_ENV]
    shutil.copytree(work / f"signed-{dim}" / version, work / f"plain-{dim}" / version)
    (work / f"plain-{dim}" / version / manifest.MANIFEST_FILE).unlink()
    logging.getLogger("vae.versions.artifacts").setLevel(logging.ERROR)  # "saved before manifests"
    plain = per_call(lambda: load_model_version(work / f"plain-{dim}", version), calls)
    os.environ[manifest.VERIFY_ENV] = public
    try:
        checked = per_call(lambda: load_model_version(work / f"signed-{dim}", version), calls)
    finally:
        del os.environ[manifest.VERIFY_ENV]
    return {"dim": dim, "checked_ms": checked * 1e3, "plain_ms": plain * 1e3, "ratio": checked / plain}


def auth_cost(work: Path, calls: int) -> dict:
    """The service's check, in process, with a token from an identity provider on 127.0.0.1."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from feast.permissions.action import AuthzedAction
    from feast.permissions.auth.oidc_token_parser import OidcTokenParser
    from feast.permissions.auth_model import OidcAuthConfig
    from feast.permissions.enforcer import enforce_policy
    from oidc import CLIENT_ID, oidc_provider

    from feast_embeddings import EmbeddingsRepo
    from vae import encode_matrix, load_model_version

    repo = work / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    definitions = EmbeddingsRepo(repo).definitions
    permissions = definitions.permissions()
    resource = definitions.entity("item", "item_id", "int64")
    version = untrained_version(work / "models", 64)
    loaded = load_model_version(work / "models", version)
    row = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    with oidc_provider() as provider:
        parser = OidcTokenParser(
            OidcAuthConfig(auth_discovery_url=provider.discovery_url, client_id=CLIENT_ID)
        )
        token = provider.token("ranker", ["vae-consumer"])
        loop = asyncio.new_event_loop()

        def check() -> None:
            user = loop.run_until_complete(parser.user_details_from_access_token(token))
            enforce_policy(permissions, user, [resource], [AuthzedAction.READ_ONLINE])

        logging.getLogger("feast").setLevel(logging.WARNING)  # the parser logs every user at INFO
        check()  # the discovery document and the JWKS fetched once, as a replica's first call does
        checked = per_call(check, calls)
        loop.close()
    encode = per_call(lambda: encode_matrix(loaded.model, loaded.normalizer, row), calls)
    return {"check_ms": checked * 1e3, "encode_one_row_ms": encode * 1e3, "ratio": checked / encode}


def logs_cost(calls: int) -> dict:
    from vae.secrets import _RedactingRecords

    plain_factory = logging.getLogRecordFactory()
    logger = logging.getLogger("benchmarks.security.logs")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.INFO)

    def emit() -> None:
        logger.info("wrote %d rows to %s as batch %s", 1797, "s3://bucket/vae/warehouse/item", "day-1")

    plain = per_call(emit, calls)
    logging.setLogRecordFactory(_RedactingRecords(plain_factory))
    try:
        redacted = per_call(emit, calls)
    finally:
        logging.setLogRecordFactory(plain_factory)
    return {"redacted_us": redacted * 1e6, "plain_us": plain * 1e6, "ratio": redacted / plain}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 784])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, dims=[16], calls=3, repeats=1)
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            runs.append(
                {
                    "load": [load_cost(work, dim, args.calls) for dim in args.dims],
                    "auth": auth_cost(work, args.calls * 10),
                    "logs": logs_cost(args.calls * 200),
                }
            )
    median = statistics.median
    result = {
        "load": [
            {key: median(run["load"][i][key] for run in runs) for key in runs[0]["load"][i]}
            for i in range(len(args.dims))
        ],
        "auth": {key: median(run["auth"][key] for run in runs) for key in runs[0]["auth"]},
        "logs": {key: median(run["logs"][key] for run in runs) for key in runs[0]["logs"]},
        "repeats": args.repeats,
    }
    for row in result["load"]:
        checked, plain = row["checked_ms"], row["plain_ms"]
        print(f"load {row['dim']}-d: {checked:.2f} ms checked vs {plain:.2f} ms: {row['ratio']:.2f}x")
    auth = result["auth"]
    print(f"auth check {auth['check_ms']:.3f} ms vs encoding one row {auth['encode_one_row_ms']:.3f} ms")
    logs = result["logs"]
    print(
        f"log record {logs['redacted_us']:.1f} us redacted vs {logs['plain_us']:.1f} us: {logs['ratio']:.2f}x"
    )
    save("security", result, show=False)


if __name__ == "__main__":
    main()
