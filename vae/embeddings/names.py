"""Names that become identifiers in Iceberg, SQL and Feast: an entity set's name and a model
version's. Plain string rules, importable by the configs (no pyarrow)."""

from __future__ import annotations

import re

from vae.errors import InputError


def identifier(name: str) -> str:
    """A model version's name as an Iceberg, SQL and Feast identifier: every character but letters, digits
    and _ becomes _ (20261123T203831Z-450da0be -> 20261123T203831Z_450da0be)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def check_entity_name(name: str) -> str:
    """An entity set's name is a namespace, a table prefix and a Feast name: checked on every path that
    takes one, before anything is created (a long name would otherwise reach PostgreSQL as a DataError)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise InputError(
            f"entity '{name}': use lower-case letters, digits and _, at most 63 characters (e.g. item, user)"
        )
    return name
