"""Real files from the field parse without loss: a SerialEM mdoc, RELION STAR files, an EMDB map."""

from __future__ import annotations

import re

import mrcfile
import numpy as np
import pandas as pd
import pytest

from conftest import TEST_DATA
from cryopool.repo.formats.mrc import read_mrc, write_mrc
from cryopool.repo.formats.star import read_star_blocks, write_star
from cryopool.repo.formats.tilts import read_mdoc

STAR_FILES = sorted((TEST_DATA / "star").rglob("*.star"))
assert len(STAR_FILES) == 5, f"the STAR test files are missing from {TEST_DATA / 'star'}"  # never run nothing


def test_mdoc_keeps_every_key_value_and_title():
    """Every ``Key = value`` line lands in the global part or its section, unchanged; titles are kept."""
    path = TEST_DATA / "mdoc/tilt_series.mdoc"
    mdoc = read_mdoc(path)
    section, seen = None, 0
    for line in path.read_text().splitlines():
        s = line.strip()
        if hit := re.fullmatch(r"\[ZValue = (\d+)\]", s):
            section = mdoc.sections[int(hit.group(1))]
        elif s.startswith("[T ="):
            assert s[1:-1].strip() in mdoc.titles
        elif "=" in s:
            key, value = (p.strip() for p in s.split("=", 1))
            assert (section if section is not None else mdoc.global_values)[key] == value
            seen += 1
    assert len(mdoc.sections) == 41 and seen == len(mdoc.global_values) + sum(map(len, mdoc.sections))
    assert mdoc.floats("TiltAngle", str(path))[0] == pytest.approx(0.000999877)
    assert any("Tilt axis angle = 85.3" in t for t in mdoc.titles)


def _loop_labels(text: str) -> dict[str, list[str]]:
    """Block → loop column labels, scanned from the text (independently of starfile)."""
    out, block, in_loop = {}, None, False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("data_"):
            block, in_loop = s[5:], False
        elif s.startswith("loop_"):
            in_loop, out[block] = True, []
        elif in_loop and s.startswith("_"):
            out[block].append(s.split()[0][1:])
        elif in_loop and s and not s.startswith("#"):
            in_loop = False
    return out


@pytest.mark.parametrize("path", STAR_FILES, ids=lambda p: p.name)
def test_star_files_keep_every_block_column_and_value(path, tmp_path):
    blocks = read_star_blocks(path)
    for block, labels in _loop_labels(path.read_text()).items():
        assert list(blocks[block].columns) == labels, block
    copy = tmp_path / path.name
    write_star(copy, blocks)
    again = read_star_blocks(copy)
    assert list(again) == list(blocks)
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            pd.testing.assert_frame_equal(again[name], block, check_dtype=False)
        else:
            assert again[name] == block, name


def test_emdb_map_reads_and_writes_back_exactly(tmp_path):
    path = TEST_DATA / "maps/EMD-3197.map"
    ours = read_mrc(path)
    with mrcfile.open(path, permissive=True) as m:
        np.testing.assert_array_equal(ours.data, m.data)
        assert ours.voxel_size_angstrom == pytest.approx([float(v) for v in m.voxel_size.tolist()])
    assert ours.data.shape == (20, 20, 20) and ours.voxel_size_angstrom[0] == pytest.approx(11.4, abs=1e-3)
    out = tmp_path / "copy.mrc"
    write_mrc(out, ours.data, ours.voxel_size_angstrom[0])
    assert mrcfile.validate(str(out))
    back = read_mrc(out)
    np.testing.assert_array_equal(back.data, ours.data)
    assert back.voxel_size_angstrom == pytest.approx(ours.voxel_size_angstrom)
