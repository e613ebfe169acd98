"""Artifacts on disk: manifests, ids and digests (`manifest`), writing an artifact safely
(`writer`: the marker, the lock, `--force`, disk space), checkpoints (`checkpoint`) and the
importers of external weight formats (`weights`). Knows the network only to build and size it."""
