"""Opening the registry at a URI, and ``Registry``: its reader, publisher and maintenance over one store.

A caller that needs one role builds it on the store (``RegistryReader(open_registry_store(uri))``);
a run, which both reads and publishes, takes the whole ``Registry`` from ``open_registry``.
"""

from __future__ import annotations

import os

from trtforge.registry.maintenance import Maintenance
from trtforge.registry.publisher import Publisher
from trtforge.registry.reader import RegistryReader
from trtforge.registry.storage import ObjectStore, TransferSettings, open_store
from trtforge.spec import DEFAULT_REGISTRY

REGISTRY_ENV = "TRTFORGE_REGISTRY"


class Registry:
    """The three roles over one store, with each of their public methods under its own name."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.uri = store.uri
        self.reader = RegistryReader(store)
        self.publisher = Publisher(store)
        self.maintenance = Maintenance(store)

        self.models = self.reader.models
        self.versions = self.reader.versions
        self.manifest = self.reader.manifest
        self.aliases = self.reader.aliases
        self.alias_history = self.reader.alias_history
        self.resolve = self.reader.resolve
        self.find_by_lineage = self.reader.find_by_lineage
        self.describe = self.reader.describe
        self.get_timing_cache = self.reader.get_timing_cache
        self.pull = self.reader.pull

        self.publish = self.publisher.publish
        self.promote = self.publisher.promote
        self.put_timing_cache = self.publisher.put_timing_cache

        self.verify = self.maintenance.verify
        self.gc = self.maintenance.gc


def registry_uri_from_env(uri: str | None = None) -> str:
    return uri or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def open_registry_store(uri: str | None = None, *, transfer: TransferSettings | None = None) -> ObjectStore:
    """The store at ``uri``; None means $TRTFORGE_REGISTRY, then ``file://artifacts/registry``."""
    return open_store(registry_uri_from_env(uri), transfer)


def open_registry(uri: str | None = None, *, transfer: TransferSettings | None = None) -> Registry:
    """The registry at ``uri``; None means $TRTFORGE_REGISTRY, then ``file://artifacts/registry``."""
    return Registry(open_registry_store(uri, transfer=transfer))
