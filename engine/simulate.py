"""The synthetic population: species, tilt series and an upstream-quality starting point, with ground truth.

``simulate(config)`` builds, per data source and item: particles of every
species at random non-overlapping positions in a slab with random
orientations, optionally moving under the beam (pose trajectories over the
exposure); the true tilt geometry (nominal tilts plus stage-angle errors,
per-tilt shifts, a smooth per-tilt image warp, optionally a volume warp) and
imaging (per-tilt defocus with astigmatism; per-particle height enters the
defocus); noise-free tilt images by ``forward.render_tilt_series`` (CTF and
exposure attenuation included) plus Gaussian noise at the requested SNR.

The *initial* state is what an upstream pipeline leaves: nominal tilt angles,
shifts with residual errors, no warp, noisy defocus, perturbed positions and
orientations, random half-sets, and half-maps reconstructed from that state.
``write_simulation`` commits the initial state as an ordinary population and
the truth as a second population attached to the commit (``attachments
["truth"]``): hashed and verified with everything else, but not what the
engine sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryopool.repo import (dose_times, DataSource, InvalidInputError, Metrics, Operation, Population, Ref, Repository,
                           Species, TiltSeriesDraft, put_stack, put_tilt_series, software_version, with_items)

from .ctf import aliasing_free_box, reconstruction_box
from .ctf_fit import circular_mask
from .forward import ParticleSet, reconstruct_half_maps, render_tilt_series, species_reconstruction_box
from .geometry import euler_zyz_to_matrix, matrix_to_euler_zyz, rotation_x, rotation_y, rotation_z, rotvec_to_matrix
from .phantoms import atomic_model_from_pdb, pseudo_atomic_model, render_map
from .projection import prepare_volume
from .records_io import ParticleColumns
from .symmetry import symmetry_operators
from .tilt_model import Imaging, TiltGeometry
from .writer import item_model, species_version

__all__ = ["SpeciesSpec", "SimulationConfig", "PRESETS", "simulate", "write_simulation", "SimulatedItem",
           "Simulation", "soft_sphere_mask", "WithheldSpecies", "withheld_species"]


@dataclass
class SpeciesSpec:
    name: str
    diameter_angstrom: float
    copies_per_item: int
    symmetry: str = "C1"
    pdb: str | None = None  # an atomic model; pseudo-atoms otherwise
    bfactor: float = 60.0


@dataclass
class SimulationConfig:
    species: list[SpeciesSpec]
    n_sources: int = 1
    items_per_source: int = 2
    pixel_size_angstrom: float = 10.0
    image_size_px: tuple[int, int] = (192, 192)
    slab_thickness_angstrom: float = 300.0
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    dose_per_tilt: float = 3.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07
    tilt_axis_angle_deg: float = 0.0
    defocus_um: float = 3.0
    defocus_spread_um: float = 0.5  # between items
    astigmatism_angstrom: float = 400.0  # U − V
    snr: float = 0.5  # signal variance / noise variance over the stack
    # the truth, relative to the nominal geometry
    stage_angle_error_deg: tuple[float, float, float] = (0.1, 0.4, 0.1)  # σ about x, y (tilt), z
    shift_error_angstrom: float = 15.0
    image_warp_grid: tuple[int, int] = (3, 3)
    image_warp_angstrom: float = 6.0
    volume_warp_grid: tuple[int, int, int, int] | None = None  # (time, z, y, x)
    volume_warp_angstrom: float = 0.0
    defocus_jitter_angstrom: float = 150.0  # per tilt
    # beam-induced particle motion: a quadratic trajectory over the exposure through the mid-exposure pose,
    # displaced at the start and the end by N(0, σ²) per axis (Å) and rotated by N(0, σ²) per axis (°)
    particle_motion_angstrom: float = 0.0
    particle_rotation_deg: float = 0.0
    # how far the initial (upstream) state is from the truth
    initial_shift_error_angstrom: float = 6.0
    initial_position_error_angstrom: float = 8.0
    initial_angle_error_deg: float = 3.0
    initial_defocus_error_angstrom: float = 300.0
    seed: int = 0

    @property
    def tilt_angles(self) -> np.ndarray:
        n = int(round((self.tilt_max_deg - self.tilt_min_deg) / self.tilt_step_deg)) + 1
        return np.linspace(self.tilt_min_deg, self.tilt_max_deg, n)


PRESETS: dict[str, SimulationConfig] = {
    # seconds on a 2-core CPU: what the test suite uses
    "test": SimulationConfig(species=[SpeciesSpec("large", 250.0, 8), SpeciesSpec("small", 100.0, 24)],
                             items_per_source=2, defocus_um=5.0),
    # the embedded demo: two labs, two species
    "demo": SimulationConfig(species=[SpeciesSpec("ribosome", 250.0, 10), SpeciesSpec("proteasome", 120.0, 14,
                                                                                       symmetry="D7")],
                             n_sources=2, items_per_source=2, image_size_px=(256, 256)),
    # hundreds of particles per tilt series, 41 tilts, finer sampling
    "realistic": SimulationConfig(species=[SpeciesSpec("large", 250.0, 120), SpeciesSpec("small", 100.0, 200)],
                                  n_sources=2, items_per_source=4, pixel_size_angstrom=5.0,
                                  image_size_px=(1024, 1024), slab_thickness_angstrom=800.0),
}


def soft_sphere_mask(box: int, radius_px: float, edge_px: float = 3.0) -> torch.Tensor:
    return circular_mask(box, radius_px, edge_px=edge_px, dims=3)


@dataclass
class SimulatedItem:
    source: str
    name: str
    stack: torch.Tensor  # (t, h, w)
    true_geometry: TiltGeometry
    true_imaging: Imaging
    initial_geometry: TiltGeometry
    initial_imaging: Imaging
    pre_exposure: torch.Tensor
    exposure: torch.Tensor
    true_particles: dict[str, ParticleSet]
    initial_particles: dict[str, ParticleSet]

    @property
    def key(self) -> str:
        return f"{self.source}/{self.name}"


@dataclass
class Simulation:
    config: SimulationConfig
    maps: dict[str, torch.Tensor]  # true maps
    boxes: dict[str, int]
    items: list[SimulatedItem]
    ids: dict[str, dict[str, np.ndarray]]  # species -> item key -> particle ids
    initial_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _box(diameter: float, pixel: float) -> int:
    b = int(np.ceil(2 * diameter / pixel))
    return b + b % 2


def _random_rotations(rng: np.random.Generator, n: int) -> torch.Tensor:
    angles = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                       rng.uniform(-180, 180, n)], 1)
    return euler_zyz_to_matrix(torch.tensor(angles))


def _small_rotations(rng: np.random.Generator, n: int, sigma_deg: float) -> torch.Tensor:
    a = torch.tensor(rng.normal(0, sigma_deg / np.sqrt(3), size=(n, 3)))
    return rotation_z(a[:, 2]) @ rotation_y(a[:, 1]) @ rotation_x(a[:, 0])


def _place(rng, cfg: SimulationConfig, radii: list[float]) -> np.ndarray:
    """Non-overlapping centres in the slab, larger particles first."""
    h, w = cfg.image_size_px
    half = np.array([w, h]) * cfg.pixel_size_angstrom / 2
    order = np.argsort(radii)[::-1]
    pts = np.zeros((len(radii), 3))
    placed: list[int] = []
    for i in order:
        r = radii[i]
        for _ in range(20000):
            xy = rng.uniform(-(half - r * 1.2), half - r * 1.2)
            z = rng.uniform(-cfg.slab_thickness_angstrom / 2 + r * 0.3, cfg.slab_thickness_angstrom / 2 - r * 0.3)
            p = np.array([xy[0], xy[1], z])
            if all(np.linalg.norm(p - pts[j]) > 1.05 * (r + radii[j]) for j in placed):
                pts[i] = p
                placed.append(i)
                break
        else:
            raise InvalidInputError("cannot place all particles without overlap", field="copies",
                                    hint="fewer copies per tilt series, or a larger image")
    return pts


def _species_maps(cfg: SimulationConfig, rng) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    maps, boxes = {}, {}
    for spec in cfg.species:
        box = _box(spec.diameter_angstrom, cfg.pixel_size_angstrom)
        if spec.pdb:
            atoms, weights = atomic_model_from_pdb(Path(spec.pdb))
        else:
            atoms, weights = pseudo_atomic_model(spec.diameter_angstrom, rng)
        vol = render_map(atoms, weights, box, cfg.pixel_size_angstrom, bfactor=spec.bfactor)
        if spec.symmetry.upper() != "C1":
            ops = symmetry_operators(spec.symmetry, dtype=torch.float64)
            atoms_sym = np.concatenate([atoms @ op.numpy().T for op in ops])
            vol = render_map(atoms_sym, np.tile(weights, len(ops)), box, cfg.pixel_size_angstrom,
                             bfactor=spec.bfactor)
        maps[spec.name], boxes[spec.name] = vol, box
    return maps, boxes


def _motion(rng, cfg: SimulationConfig, pos: torch.Tensor, ori: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories (3 temporal samples) through the mid-exposure pose, or the static pose without motion."""
    if cfg.particle_motion_angstrom <= 0 and cfg.particle_rotation_deg <= 0:
        return pos, ori
    n = pos.shape[0]
    ends = torch.tensor(rng.normal(0, 1, (n, 2, 2, 3)))  # (n, start/end, shift/rotation, xyz)
    zero = torch.zeros(n, 1, 3, dtype=torch.float64)
    shifts = torch.cat([ends[:, :1, 0], zero, ends[:, 1:, 0]], 1) * cfg.particle_motion_angstrom
    turns = torch.cat([ends[:, :1, 1], zero, ends[:, 1:, 1]], 1) * cfg.particle_rotation_deg
    return pos[:, None] + shifts, rotvec_to_matrix(turns) @ ori[:, None]


def _item(cfg: SimulationConfig, rng, source: str, name: str, maps, boxes) -> SimulatedItem:
    tilts = torch.tensor(cfg.tilt_angles)
    t = len(tilts)
    h, w = cfg.image_size_px
    px = cfg.pixel_size_angstrom
    order = np.argsort(np.abs(cfg.tilt_angles), kind="stable")  # dose-symmetric-like: low tilts first
    exposure = torch.full((t,), cfg.dose_per_tilt, dtype=torch.float64)
    pre = torch.zeros(t, dtype=torch.float64)
    pre[torch.tensor(order)] = torch.arange(t, dtype=torch.float64) * cfg.dose_per_tilt
    time = torch.from_numpy(dose_times(pre.numpy(), exposure.numpy()))
    tomo = (w * px, h * px, cfg.slab_thickness_angstrom * 1.5)
    sigma = torch.tensor(cfg.stage_angle_error_deg)
    true_geom = TiltGeometry(
        tilt_angles_deg=tilts, tilt_axis_angle_deg=cfg.tilt_axis_angle_deg,
        shifts_angstrom=torch.tensor(rng.normal(0, cfg.shift_error_angstrom, (t, 2))),
        angle_corrections_deg=torch.tensor(rng.normal(size=(t, 3))) * sigma,
        image_size_px=(h, w), tomogram_size_angstrom=tomo, pixel_size_angstrom=px, dose_time=time,
        image_warp=(torch.tensor(rng.normal(0, cfg.image_warp_angstrom, (2, t, *cfg.image_warp_grid)))
                    if cfg.image_warp_angstrom > 0 else None),
        volume_warp=(torch.tensor(rng.normal(0, cfg.volume_warp_angstrom, (3, *cfg.volume_warp_grid)))
                     if cfg.volume_warp_grid and cfg.volume_warp_angstrom > 0 else None))
    base = (cfg.defocus_um + rng.uniform(-cfg.defocus_spread_um, cfg.defocus_spread_um)) * 1e4
    defocus = base + torch.tensor(rng.normal(0, cfg.defocus_jitter_angstrom, t))
    angle = float(rng.uniform(-90, 90))
    true_im = Imaging(defocus + cfg.astigmatism_angstrom / 2, defocus - cfg.astigmatism_angstrom / 2,
                      torch.full((t,), angle, dtype=torch.float64), cfg.voltage_kv, cfg.spherical_aberration_mm,
                      cfg.amplitude_contrast)
    radii = [s.diameter_angstrom / 2 for s in cfg.species for _ in range(s.copies_per_item)]
    centres = _place(rng, cfg, radii)
    true_p, init_p = {}, {}
    k = 0
    for spec in cfg.species:
        n = spec.copies_per_item
        pos = torch.tensor(centres[k:k + n])
        k += n
        ori = _random_rotations(rng, n)
        halves = torch.tensor(rng.permutation(np.arange(n) % 2 + 1))
        true_p[spec.name] = ParticleSet(*_motion(rng, cfg, pos, ori), halves)
        init_p[spec.name] = ParticleSet(
            pos + torch.tensor(rng.normal(0, cfg.initial_position_error_angstrom, (n, 3))),
            _small_rotations(rng, n, cfg.initial_angle_error_deg) @ ori, halves)
    max_def = float(true_im.defocus_u_angstrom.max()) + cfg.slab_thickness_angstrom
    optics = dict(voltage_kv=cfg.voltage_kv, spherical_aberration_mm=cfg.spherical_aberration_mm)
    big = max(aliasing_free_box(max_def, 2 * px, px, **optics), 2 * max(boxes.values()),  # holds every delocalised image
              *(reconstruction_box(sp.diameter_angstrom, max_def, 2 * px, px, **optics) for sp in cfg.species))
    clean = render_tilt_series([(prepare_volume(maps[s.name]), true_p[s.name]) for s in cfg.species], true_geom,
                               true_im, pre, exposure, big)
    noise = clean.std() / np.sqrt(cfg.snr)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    stack = clean + noise * torch.randn(clean.shape, generator=gen)
    init_geom = replace(true_geom, angle_corrections_deg=torch.zeros(t, 3, dtype=torch.float64), image_warp=None,
                        volume_warp=None,
                        shifts_angstrom=true_geom.shifts_angstrom + torch.tensor(
                            rng.normal(0, cfg.initial_shift_error_angstrom, (t, 2))))
    jitter = torch.tensor(rng.normal(0, cfg.initial_defocus_error_angstrom, t))
    init_im = replace(true_im, defocus_u_angstrom=true_im.defocus_u_angstrom + jitter,
                      defocus_v_angstrom=true_im.defocus_v_angstrom + jitter)
    return SimulatedItem(source, name, stack.float(), true_geom, true_im, init_geom, init_im, pre, exposure, true_p,
                         init_p)


def reconstruct_species(items: list[SimulatedItem], spec: SpeciesSpec, box: int, *, truth: bool,
                        pixel: float, voltage_kv: float, cs_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-maps ``(box³)`` of one species from all items, at the true or the initial state."""
    accs = None
    ops = symmetry_operators(spec.symmetry)
    states = [(it.true_geometry, it.true_imaging) if truth else (it.initial_geometry, it.initial_imaging)
              for it in items]
    max_def = max(float(im.defocus_u_angstrom.abs().max()) + g.tomogram_size_angstrom[2] / 2 for g, im in states)
    rec_box = species_reconstruction_box(spec.diameter_angstrom, box, pixel, max_def, voltage_kv=voltage_kv,
                                         spherical_aberration_mm=cs_mm)
    for it, (geom, im) in zip(items, states):
        parts = (it.true_particles if truth else it.initial_particles)[spec.name]
        accs = reconstruct_half_maps(it.stack, geom, im, parts, it.pre_exposure, it.exposure, box=rec_box,
                                     symmetry=ops, accumulators=accs)
    return accs[0].finalise(size=box), accs[1].finalise(size=box)


def simulate(config: SimulationConfig, progress=None) -> Simulation:
    """Build the whole synthetic population; ``progress(done, total)`` follows items and reconstructions."""
    rng = np.random.default_rng(config.seed)
    total = config.n_sources * config.items_per_source + len(config.species)
    done = 0
    maps, boxes = _species_maps(config, rng)
    items = []
    for s in range(config.n_sources):
        for i in range(config.items_per_source):
            items.append(_item(config, rng, f"lab_{chr(ord('a') + s)}", f"TS_{i + 1:02d}", maps, boxes))
            done += 1
            if progress:
                progress(done, total)
    ids = {spec.name: {it.key: rng.integers(1, 2**63, size=spec.copies_per_item).astype(np.uint64)
                       for it in items} for spec in config.species}
    sim = Simulation(config, maps, boxes, items, ids)
    for spec in config.species:
        sim.initial_maps[spec.name] = reconstruct_species(
            items, spec, boxes[spec.name], truth=False, pixel=config.pixel_size_angstrom,
            voltage_kv=config.voltage_kv, cs_mm=config.spherical_aberration_mm)
        done += 1
        if progress:
            progress(done, total)
    return sim


def _columns(sim: Simulation, name: str, truth: bool) -> ParticleColumns:
    keys = [it.key for it in sim.items]
    parts = [(it.true_particles if truth else it.initial_particles)[name] for it in sim.items]
    return ParticleColumns(
        ids=np.concatenate([sim.ids[name][k] for k in keys]), item_names=keys,
        item_index=torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)]),
        positions=torch.cat([p.positions.reshape(len(p), -1, 3) for p in parts]),
        orientations=torch.cat([p.orientations.reshape(len(p), -1, 3, 3) for p in parts]),
        half_sets=torch.cat([p.half_sets for p in parts]),
        scores=torch.full((sum(len(p) for p in parts),), float("nan"), dtype=torch.float64))


def _population(tx: Repository, sim: Simulation, stacks: dict[str, Ref], *, truth: bool,
                withhold: tuple[str, ...] = ()) -> Population:
    cfg = sim.config
    items: dict[str, Ref] = {}
    for it in sim.items:
        geom, im = (it.true_geometry, it.true_imaging) if truth else (it.initial_geometry, it.initial_imaging)
        h, w = cfg.image_size_px
        items[it.key] = put_tilt_series(tx, TiltSeriesDraft(
            name=it.name, stack=stacks[it.key], pixel_size_angstrom=cfg.pixel_size_angstrom,
            voltage_kv=cfg.voltage_kv, spherical_aberration_mm=cfg.spherical_aberration_mm,
            amplitude_contrast=cfg.amplitude_contrast, tilt_axis_angle_deg=cfg.tilt_axis_angle_deg,
            tilt_angles_deg=cfg.tilt_angles, exposure_e_per_angstrom2=it.exposure,
            pre_exposure_e_per_angstrom2=it.pre_exposure,
            tomogram_size_px=[w, h, int(round(geom.tomogram_size_angstrom[2] / cfg.pixel_size_angstrom))],
            handedness=1, model=item_model(geom, im), metadata={"simulated": True, "truth": truth},
            origin=f"simulated tilt series {it.key}"))
    species = {}
    for spec in cfg.species:
        if spec.name in withhold:
            continue
        box = sim.boxes[spec.name]
        h1, h2 = (sim.maps[spec.name], sim.maps[spec.name]) if truth else sim.initial_maps[spec.name]
        record = Species(name=spec.name, symmetry=spec.symmetry.upper(), diameter_angstrom=spec.diameter_angstrom,
                         pixel_size_angstrom=cfg.pixel_size_angstrom, half_map_1=None, half_map_2=None, mask=None,
                         particles=None, metrics=Metrics(), metadata={"simulated": True, "truth": truth})
        species[spec.name] = species_version(
            tx, record, (h1, h2), _columns(sim, spec.name, truth), metrics=Metrics(),
            reconstructed_from=[items[k] for k in sorted(items)],
            mask=soft_sphere_mask(box, 0.55 * spec.diameter_angstrom / cfg.pixel_size_angstrom))
    sources = {it.source: tx.put_record(DataSource(name=it.source, items={}, description="simulated"))
               for it in sim.items}
    return with_items(tx, Population(name="truth" if truth else "simulated", data_sources=sources, species=species),
                      items)


def write_simulation(repo: Repository, sim: Simulation, *, branch: str | None = None,
                     message: str | None = None, withhold: tuple[str, ...] = ()) -> str:
    """Commit the initial state as the population and the truth as ``attachments["truth"]``.

    Species in ``withhold`` are in the images and the truth but not in the population: nobody has picked them
    yet (``withheld_species`` gives their upstream-quality start, for another lab to import).
    """
    unknown = sorted(set(withhold) - set(sim.maps))
    if unknown:
        raise InvalidInputError(f"no species {unknown} in the simulation", field="withhold", expected=sorted(sim.maps))
    if set(withhold) >= set(sim.maps):
        raise InvalidInputError("at least one species must stay in the population", field="withhold")
    with repo.transaction() as tx:
        stacks = {it.key: put_stack(tx, it.stack.numpy(), f"simulated tilt series {it.key}") for it in sim.items}
        initial = _population(tx, sim, stacks, truth=False, withhold=tuple(withhold))
        truth_ref = tx.put_record(_population(tx, sim, stacks, truth=True))
        params = asdict(sim.config) | ({"withheld": sorted(withhold)} if withhold else {})
        operation = Operation(kind="simulate", parameters=params, software=software_version(),
                              inputs={"truth": truth_ref})
        n_items = len(sim.items)
        n_particles = sum(len(p) for it in sim.items for p in it.true_particles.values())
        return tx.commit(initial, message=message or f"Simulate {n_items} tilt series, {len(sim.maps)} species, "
                                                      f"{n_particles} particles (seed {sim.config.seed})",
                         operation=operation, branch=branch, attachments={"truth": truth_ref}, retries=0)


@dataclass
class WithheldSpecies:
    """A species present in the images but not in the committed population, as a picker would hand it over."""

    half_maps: tuple[np.ndarray, np.ndarray]
    mask: np.ndarray
    pixel_size_angstrom: float
    diameter_angstrom: float
    symmetry: str
    item_keys: list[str]  # "source/item" per particle
    positions_angstrom: np.ndarray  # (n, 3) from the tomogram centre, upstream-quality (perturbed)
    euler_zyz_deg: np.ndarray  # (n, 3) RELION rot, tilt, psi
    half_sets: np.ndarray  # (n,) 1 or 2


def withheld_species(sim: Simulation, name: str) -> WithheldSpecies:
    spec = next(s for s in sim.config.species if s.name == name)
    cols = _columns(sim, name, truth=False)
    h1, h2 = sim.initial_maps[name]
    box = sim.boxes[name]
    return WithheldSpecies(
        half_maps=(h1.numpy().astype(np.float32), h2.numpy().astype(np.float32)),
        mask=soft_sphere_mask(box, 0.55 * spec.diameter_angstrom / sim.config.pixel_size_angstrom).numpy(),
        pixel_size_angstrom=sim.config.pixel_size_angstrom, diameter_angstrom=spec.diameter_angstrom,
        symmetry=spec.symmetry.upper(), item_keys=[cols.item_names[int(i)] for i in cols.item_index],
        positions_angstrom=cols.positions[:, 0].numpy(),
        euler_zyz_deg=matrix_to_euler_zyz(cols.orientations[:, 0]).numpy(),
        half_sets=cols.half_sets.numpy())
