"""ktnas.cache: frozen pretrained stems and their feature store (precompute, backends, streaming reader)."""
from .errors import KtnasError
from .store import FeatureStore, create_store, open_store

__all__ = ["KtnasError", "FeatureStore", "create_store", "open_store"]
