"""cryopool.engine: the multi-particle refinement engine (device-agnostic torch).

It reaches the repository only through ``cryopool.repo``'s public API. The
physics core, the simulator and ``refine`` arrive with their issues; until
then this package is intentionally empty.
"""
