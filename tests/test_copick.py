"""copick projects: exported particles read back by cryopool and by the copick library itself (which pins
zarr < 3, so it runs in a virtual environment of its own), and clear errors for what cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import _under_ci, lab_population
from cryopool.cli.main import cli
from cryopool.repo import ParticleTable, Species, iter_items
from cryopool.repo.copick import copick_name, export_copick, import_copick
from cryopool.repo.errors import FormatError, InvalidInputError
from cryopool.repo.star_particles import euler_matrix

COPICK = "copick==1.31.0"
VENV = Path(__file__).resolve().parents[1] / ".venv-copick"


def _table(repo, name, rev="HEAD"):
    sp = repo.get_record(repo.population(rev).species[name], Species)
    t = repo.get_record(sp.particles, ParticleTable)
    col = {k: repo.get_array(v).read() for k, v in t.columns.items()}
    order = np.argsort(col["particle_id"])
    return {k: v[order] for k, v in col.items()}, [t.item_names[i] for i in col["item_index"][order]]


@pytest.fixture
def pop(tmp_path, inputs):
    """Lab A's two tilt series (an odd tomogram edge included) and species S1."""
    return lab_population(tmp_path / "pop", inputs)


def test_export_then_import_gives_back_the_same_particles(pop, tmp_path):
    before, items = _table(pop, "S1")
    export_copick(pop, "HEAD", tmp_path / "cp")
    config = tmp_path / "cp" / "copick_config.json"
    assert json.loads(config.read_text())["pickable_objects"][0]["name"] == "S1"
    import_copick(pop, config, "S1")
    after, items_after = _table(pop, "S1")
    assert items_after == items
    np.testing.assert_array_equal(after["particle_id"], before["particle_id"])
    np.testing.assert_allclose(after["position_angstrom"], before["position_angstrom"], atol=1e-9)
    np.testing.assert_allclose(euler_matrix(after["orientation_deg"].reshape(-1, 3)),
                               euler_matrix(before["orientation_deg"].reshape(-1, 3)), atol=1e-9)
    np.testing.assert_array_equal(after["half_set"], before["half_set"])  # kept for particles it already had
    assert pop.get_commit("HEAD").operation.parameters["what"] == "copick"


def test_locations_follow_the_tomogram_origin_and_relion_matrices(pop, tmp_path):
    before, items = _table(pop, "S1")
    export_copick(pop, "HEAD", tmp_path / "cp")
    ts = {k: t for k, _, t in iter_items(pop, pop.population())}
    key = items[0]
    run = key.split("/")[1]
    picks = json.loads((tmp_path / "cp" / "overlay" / "ExperimentRuns" / run / "Picks" /
                        "cryopool_0_S1.json").read_text())
    point = next(p for p in picks["points"] if p["instance_id"] == int(before["particle_id"][0]))
    size, px = np.asarray(ts[key].tomogram_size_px), ts[key].pixel_size_angstrom
    expected = before["position_angstrom"].reshape(-1, 3)[0] + np.floor(size / 2) * px
    np.testing.assert_allclose([point["location"][a] for a in "xyz"], expected)
    np.testing.assert_allclose(np.asarray(point["transformation_"])[:3, :3],
                               euler_matrix(before["orientation_deg"].reshape(-1, 3)[0]))


def test_names_copick_refuses_are_mapped_and_mapped_back(pop, tmp_path, inputs):
    assert copick_name("my_complex 2") == "my-complex-2"
    import_copick(pop, _exported(pop, tmp_path / "a"), "S1", "my_complex", half_maps=(np.zeros((8, 8, 8)),) * 2,
                  pixel_size_angstrom=10.0, diameter_angstrom=100)
    config = _exported(pop, tmp_path / "b")
    objects = [o["name"] for o in json.loads(config.read_text())["pickable_objects"]]
    assert objects == ["S1", "my-complex"]
    import_copick(pop, config, "my-complex")  # the export recorded which species the object is
    assert pop.get_commit("HEAD").operation.parameters["species"] == "my_complex"
    with pytest.raises(InvalidInputError, match="exists"):
        export_copick(pop, "HEAD", tmp_path / "b")


def _exported(pop, folder) -> Path:
    export_copick(pop, "HEAD", folder)
    return folder / "copick_config.json"


def test_what_cannot_be_imported_is_refused_with_the_file_and_field(pop, tmp_path, inputs):
    export_copick(pop, "HEAD", tmp_path / "cp")
    config = tmp_path / "cp" / "copick_config.json"
    with pytest.raises(InvalidInputError, match="no such pickable object"):
        import_copick(pop, config, "nothing")
    with pytest.raises(InvalidInputError, match="half-maps and diameter"):
        import_copick(pop, config, "S1", "S9")
    pick_files = sorted((tmp_path / "cp" / "overlay").rglob("cryopool_0_S1.json"))
    other = pick_files[0].with_name("alice_1_S1.json")
    other.write_text(pick_files[0].read_text())
    with pytest.raises(InvalidInputError, match="several users"):
        import_copick(pop, config, "S1")
    other.unlink()
    data = json.loads(pick_files[0].read_text())
    data["points"][1]["location"]["x"] = "a lot"
    pick_files[0].write_text(json.dumps(data))
    with pytest.raises(FormatError) as info:
        import_copick(pop, config, "S1")
    assert "points[1]" in str(info.value) and pick_files[0].name in str(info.value)


def test_a_new_species_from_copick_picks_through_the_command_line(pop, tmp_path, inputs):
    export_copick(pop, "HEAD", tmp_path / "cp")
    config = tmp_path / "cp" / "copick_config.json"
    result = CliRunner().invoke(cli, ["-C", str(pop.work_dir), "import", "copick", str(config), "--object", "S1",
                                      "--species", "S1_again", "--half1", str(inputs["half1"]), "--half2",
                                      str(inputs["half2"]), "--diameter", "100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["species"] == "S1_again"
    a, _ = _table(pop, "S1")
    b, _ = _table(pop, "S1_again")
    np.testing.assert_array_equal(a["particle_id"], b["particle_id"])


def _copick_python() -> str:
    """The copick library in a virtual environment of its own (created once, then reused)."""
    exe = os.environ.get("CRYOPOOL_COPICK_PYTHON") or str(VENV / "bin" / "python")
    if Path(exe).exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", COPICK], check=True, capture_output=True,
                       timeout=1200)
    except (subprocess.SubprocessError, OSError) as exc:
        if _under_ci():
            pytest.fail(f"could not install {COPICK} into {VENV}: {exc}")
        pytest.skip(f"could not install {COPICK} into {VENV}: {exc}")
    return exe


def test_the_copick_library_reads_what_cryopool_writes(pop, tmp_path):
    before, items = _table(pop, "S1")
    volume = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    key = items[0]
    export_copick(pop, "HEAD", tmp_path / "cp", tomograms={key: (volume, 20.0)})
    script = textwrap.dedent("""
        import json, sys
        import copick
        root = copick.from_file(sys.argv[1])
        out = {"objects": [o.name for o in root.pickable_objects], "runs": {}}
        for run in root.runs:
            picks = run.get_picks(object_name="S1", user_id="cryopool", session_id="0")
            points, transforms = picks[0].numpy() if picks else (None, None)
            tomos = {}
            for vs in run.voxel_spacings:
                for t in vs.tomograms:
                    tomos[f"{vs.voxel_size:.3f}/{t.tomo_type}"] = t.numpy().tolist()
            out["runs"][run.name] = {
                "ids": [p.instance_id for p in picks[0].points] if picks else [],
                "points": None if points is None else points.tolist(),
                "transforms": None if transforms is None else transforms.tolist(), "tomograms": tomos}
        print(json.dumps(out))
    """)
    done = subprocess.run([_copick_python(), "-c", script, str(tmp_path / "cp" / "copick_config.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["objects"] == ["S1"]
    ids = [i for r in seen["runs"].values() for i in r["ids"]]  # 64-bit ids, exactly (Python ints)
    assert sorted(ids) == sorted(int(i) for i in before["particle_id"])
    run = key.split("/")[1]
    assert seen["runs"][run]["tomograms"] == {"20.000/wbp": volume.tolist()}
    transforms = np.concatenate([np.asarray(r["transforms"]) for r in seen["runs"].values() if r["transforms"]])
    order = np.argsort(np.array(ids, dtype=np.uint64))
    np.testing.assert_allclose(transforms[order][:, :3, :3], euler_matrix(before["orientation_deg"].reshape(-1, 3)),
                               atol=1e-9)
