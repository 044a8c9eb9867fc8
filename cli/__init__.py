"""cryopool.cli: the ``cryopool`` command, a thin click layer over cryopool.repo (and later the engine)."""
