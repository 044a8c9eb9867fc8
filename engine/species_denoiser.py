"""Training a species' denoiser where the species is created, as M does (and continues at every refinement).

The network is M's noise2noise U-net (``regularisers.Noise2NoiseDenoiser``) trained on the species' two
half-maps, whitened, up to the working resolution its FSC gives. It starts from the weights the species
already has, if they are of this kind, and is stored as the species' ``denoiser`` (a StateDict): the next
``refine --regulariser denoiser`` continues from it. The half-maps themselves are not changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from cryopool.repo import ConflictError, NotFoundError, Operation, Population, Repository, Species, software_version

from .denoiser import DenoiserSettings
from .records_io import load_map, load_weights
from .refine import species_fsc
from .regularise import HalfMaps, working_resolution
from .regularisers import Noise2NoiseDenoiser
from .writer import species_with_denoiser

__all__ = ["train_species_denoisers"]


def train_species_denoisers(repo: Repository, names: list[str] | None = None, *, steps: int = DenoiserSettings.steps,
                            branch: str | None = None, device: torch.device | str = "cpu", message: str | None = None,
                            progress: Callable[[str], None] | None = None) -> tuple[str, dict[str, dict]]:
    """Train (or continue training) the denoiser of each species in ``names`` (default: all) at the tip of
    ``branch``; one commit. Returns its id and, per species, what the training did."""
    ref_name = repo.branch_ref(branch)
    tip = repo.refs.read(ref_name)
    if tip is None:
        raise NotFoundError("the branch has no commits", hint="import or simulate a population first")
    population = repo.population(tip)
    names = sorted(population.species) if names is None else names
    unknown = sorted(set(names) - set(population.species))
    if unknown or not names:
        raise NotFoundError(f"no species {unknown} in the population" if unknown else "the population has no species",
                            field="species", expected=sorted(population.species))
    denoiser = Noise2NoiseDenoiser(DenoiserSettings(steps=steps))
    done: dict[str, dict] = {}
    with repo.transaction() as tx:
        new = {}
        for name in names:
            record = repo.get_record(population.species[name], Species)
            if progress:
                progress(name)
            h1, h2 = (load_map(repo, record, k).to(device) for k in ("half_map_1", "half_map_2"))
            mask = load_map(repo, record, "mask").to(device) if record.mask is not None else None
            curve = species_fsc(repo, record, h1, h2, mask)
            resolution = working_resolution(curve, record.pixel_size_angstrom)
            result = denoiser(HalfMaps((h1, h2), curve, record.pixel_size_angstrom, resolution, None,
                                       load_weights(repo, record)))
            new[name] = species_with_denoiser(tx, record, result.weights)
            done[name] = {**result.record, "resolution_angstrom": round(resolution, 2),
                          "total_steps": result.weights.metadata["steps"]}
        before = dict(population.species)

        def update(pop: Population | None) -> Population:
            if pop is None or any(pop.species.get(n) != before[n] for n in names):
                raise ConflictError("a species changed while its denoiser was training; run the command again")
            return replace(pop, species={**pop.species, **new})

        operation = Operation(kind="edit", software=software_version(), parameters={
            "what": "train-denoiser", "settings": denoiser.parameters(), "species": done})
        commit = tx.commit(update, branch=branch, operation=operation, retries=0,
                           message=message or f"Train the denoiser of {', '.join(names)} ({steps} steps)")
    return commit, done
