"""The shard cache for object stores, moved to `horovod_iter.shards.remote`: this path keeps
old imports working."""
from __future__ import annotations

from .shards.remote import ShardCache, content_identity, default_cache_dir, is_remote, local_path

__all__ = ["ShardCache", "content_identity", "default_cache_dir", "is_remote", "local_path"]
