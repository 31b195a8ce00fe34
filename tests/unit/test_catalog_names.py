"""Names that are identifiers: an entity set's name is checked on every path before anything is
created, and a version name that only maps to another version's table (a_b for a-b) is refused,
never recorded as a second spelling of one version."""

import pyarrow as pa
import pytest

from vae.embeddings import contract
from vae.embeddings.catalog import EmbeddingsCatalog
from vae.errors import InputError
from vae.pipeline.decisions import DecisionLog

VERSION = "20261201T000000Z-0a1b2c3d"


@pytest.fixture
def catalog(tmp_path) -> EmbeddingsCatalog:
    return EmbeddingsCatalog(f"sqlite:///{tmp_path}/catalog.db", str(tmp_path / "warehouse"))


def test_a_version_spelled_with_underscores_is_not_the_version(catalog):
    entity = catalog.register("item", "item_id", "int64")
    catalog.create_table(entity, VERSION, contract.schema("item_id", pa.int64()), {})
    assert catalog.table("item", VERSION).properties["vae.model-version"] == VERSION
    alias = VERSION.replace("-", "_")
    with pytest.raises(
        InputError, match=f"no embeddings by model version '{alias}'; did you mean '{VERSION}'"
    ):
        catalog.table("item", alias)
    with pytest.raises(InputError, match=f"did you mean '{VERSION}'"):
        catalog.create_table(entity, alias, contract.schema("item_id", pa.int64()), {})
    assert catalog.versions("item") == [VERSION]


@pytest.mark.parametrize("name", ["Item", "item-set", "x" * 64, "1item", ""])
def test_entity_names_are_checked_on_every_path_before_anything_is_created(catalog, name):
    for path in (
        lambda: catalog.register(name, "item_id", "int64"),
        lambda: catalog.entity_set(name),
        lambda: catalog.table(name, VERSION),
        lambda: catalog.entity_properties(name),
        lambda: catalog.update_entity_properties(name, {"x": "1"}),
        lambda: DecisionLog(catalog, name),
    ):
        with pytest.raises(InputError, match=r"use lower-case letters, digits and _, at most 63 characters"):
            path()
    assert catalog.catalog.list_namespaces() == []
