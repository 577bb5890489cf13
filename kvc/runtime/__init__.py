"""Runtime: the objects that graph ops reach through integer ids (caches, pools, streams, events)."""
