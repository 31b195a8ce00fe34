"""A Feast file registry that readers can never catch half-written.

Feast's FileRegistryStore truncates registry.db and writes it in place, so a reader in another
process (a model server, `feast serve`) that refreshes its cache during a publish can parse a
partial file. This store writes a temporary file and renames it over the registry: readers see
the old registry or the new one. Used by feature_repo/feature_store.yaml
(`registry_store_type: feast_embeddings.registry.AtomicFileRegistryStore`).
"""

from __future__ import annotations

import os
import uuid

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.utils import _utc_now


class AtomicFileRegistryStore(FileRegistryStore):
    def _write_registry(self, registry_proto: RegistryProto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        self._filepath.parent.mkdir(exist_ok=True)
        temporary = self._filepath.with_name(f".{self._filepath.name}.{uuid.uuid4().hex}")
        with open(temporary, mode="wb", buffering=0) as f:
            f.write(registry_proto.SerializeToString())
            os.fsync(f.fileno())
        os.replace(temporary, self._filepath)
