"""Per-document KV caches: the store (disk + memory LRU) and the service that builds,
loads and joins them for the `kv` strategy."""
