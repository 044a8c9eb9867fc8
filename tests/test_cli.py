"""The command line, driven as a user would (click's CliRunner), asserting on --json output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import particle_rows, write_mrc, write_particles
from cryopool.cli.main import cli
from cryopool.repo import Repository, TiltSeries
from cryopool.repo.population import find_item, iter_items


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    pop = str(tmp_path / "pop")

    def invoke(*args, ok=True):
        result = runner.invoke(cli, ["-C", pop, *map(str, args)], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke.pop = pop
    return invoke


def _json(result) -> dict:
    data = json.loads(result.stdout)
    assert data["format_version"] == 1
    return data


TS = ["--tilt-angles", "-12:12:3", "--dose-per-tilt", "3", "--defocus-um", "3"]


def test_full_walk(run, inputs, tmp_path):
    run("init", run.pop)
    assert "No commits yet" in run("status").output
    c1 = _json(run("import", "tilt-series", inputs["ts1"], "--source", "lab_a", *TS, "--json"))["commit"]
    run("import", "tilt-series", inputs["ts2"], "--source", "lab_a", *TS)
    out = _json(run("import", "species", "ribo", "--half1", inputs["half1"], "--half2", inputs["half2"], "--mask",
                    inputs["mask"], "--particles", inputs["particles"], "--diameter", "250", "--json"))
    assert out["particles"] == 8
    log = _json(run("log", "--json"))["commits"]
    assert [c["operation"] for c in log] == ["import"] * 3 and log[-1]["id"] == c1
    assert "* " in run("log", "--graph", "--oneline").output
    assert "Author:" in run("log").output
    status = _json(run("status", "--json"))
    assert status["branch"] == "main" and status["population"]["species"]["ribo"]["particles"] == 8
    assert "ribo" in run("status").output

    species = _json(run("show", "HEAD:species/ribo", "--json"))
    assert species["particles"] == 8 and species["half_sets"] == [4, 4] and species["box_px"] == 16
    item = _json(run("show", "HEAD:lab_a/TS_01", "--json"))
    assert item["tilts"] == 9 and item["tilt_range_deg"] == [-12.0, 12.0] and item["image_size_px"] == [64, 48]
    assert "9 tilts" in run("show", "HEAD:items/lab_a/TS_01").output
    commit = _json(run("show", "--json"))
    assert commit["operation"]["kind"] == "import" and commit["diff"]["species"]["added"]["ribo"]["particles"] == 8
    raw = _json(run("show", "--raw", commit["population"]))
    assert raw["record"]["_type"] == "Population"

    d = _json(run("diff", c1, "HEAD", "--json"))["diff"]
    assert d["items"]["added"] == ["lab_a/TS_02"] and "ribo" in d["species"]["added"]
    assert "+ species ribo (8 particles)" in run("diff", c1).output

    run("branch", "lab-b")
    run("tag", "v1")
    assert _json(run("branch", "--json"))["branches"].keys() == {"main", "lab-b"}
    assert _json(run("tag", "--json"))["tags"]["v1"] == commit["id"]
    assert _json(run("checkout", "lab-b", "--json"))["branch"] == "lab-b"
    run("import", "tilt-series", inputs["ts1"], "--source", "lab_b", *TS)
    d = _json(run("diff", "main", "lab-b", "--json"))["diff"]
    assert d["data_sources"]["added"] == ["lab_b"]
    assert _json(run("checkout", "HEAD~1", "--json"))["branch"] is None

    v = _json(run("verify", "--json"))
    assert v["ok"] and v["commits"] == 4 and v["problems"] == []
    assert "OK:" in run("verify", "--quick").output
    g = _json(run("gc", "--json"))
    assert g["removed"] == 0


def test_verify_exit_code_and_report_on_damage(run, inputs):
    run("init", run.pop)
    run("import", "tilt-series", inputs["ts1"], "--source", "lab_a", *TS)
    repo = Repository.open(run.pop)
    victim = sorted(repo.store.ids())[0]
    path = repo.store.path(victim)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = run("verify", ok=False)
    assert result.exit_code == 1 and victim in result.output and "FAILED" in result.output
    data = json.loads(run("verify", "--json", ok=False).stdout)
    assert not data["ok"] and data["problems"][0]["object"] == victim


def test_errors_are_one_clear_line(run, inputs, tmp_path):
    result = run("status", ok=False)
    assert result.exit_code == 1 and "not a cryopool repository" in result.output and "hint:" in result.output
    run("init", run.pop)
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"\x00" * 100)
    result = run("import", "tilt-series", bad, "--source", "x", *TS, ok=False)
    assert result.exit_code == 1 and "broken.mrc" in result.output and "Traceback" not in result.output
    result = run("import", "tilt-series", inputs["ts1"], "--source", "x", "--tilt-angles", "-12:12:3", ok=False)
    assert "dose per tilt" in result.output and "--dose-per-tilt" in result.output
    assert run("frobnicate", ok=False).exit_code == 2
    assert run("init", run.pop, ok=False).exit_code == 1  # already exists


@pytest.mark.parametrize("args, kind, words", [
    (["status", "--json"], "NotFoundError", "not a cryopool repository"),
    (["import", "tilt-series", "{ts1}", "--source", "x", "--tilt-angles", "nan:nan:1", "--dose-per-tilt", "3",
      "--defocus-um", "3", "--json"], "InvalidInputError", "tilt range"),
    (["import", "tilt-series", "{ts1}", "--source", "x", *TS, "--group-size", "0", "--json"], "InvalidInputError",
     "group_size"),
    (["import", "species", "s", "--half1", "{half1}", "--half2", "{half2}", "--particles", "{particles}",
      "--diameter", "inf", "--json"], "InvalidInputError", "diameter"),
    (["import", "species", "s", "--half1", "{half1}", "--half2", "{half2}", "--particles", "{particles}",
      "--diameter", "100", "--symmetry", "C99999999999", "--json"], "InvalidInputError", "symmetry"),
    (["refine", "--device", "cuda", "--json"], "InvalidInputError", "CUDA"),
])
def test_errors_under_json_are_json_objects(run, inputs, args, kind, words):
    """Bad input under --json: one JSON error object on stdout, exit 1, never a traceback (nor a hang)."""
    if args[0] != "status":
        run("init", run.pop)
        run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS)
    result = run(*[a.format(**inputs) for a in args], ok=False)
    assert result.exit_code == 1, result.output
    error = _json(result)["error"]
    assert error["type"] == kind and words in error["text"], error


def test_int16_stack_via_cli(run, tmp_path):
    run("init", run.pop)
    stack = write_mrc(tmp_path / "TS_05.mrc", np.arange(9 * 8 * 8, dtype=np.int16).reshape(9, 8, 8))
    run("import", "tilt-series", stack, "--source", "s", *TS)
    assert "int16" in run("show", "HEAD:TS_05").output


def test_simulate_command(tmp_path):
    pop = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["simulate", str(pop), "--species", "blob:150:3", "--items", "1",
                                      "--image-size", "96", "--seed", "4", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["species"]["blob"]["particles"] == 3 and data["nyquist_angstrom"] == 20.0
    repo = Repository.open(pop)
    commit = repo.get_commit(data["commit"])
    assert commit.operation.kind == "simulate" and commit.operation.parameters["seed"] == 4
    assert "truth" in commit.attachments
    bad = CliRunner().invoke(cli, ["simulate", str(pop), "--species", "oops"])
    assert bad.exit_code == 2 and "NAME:DIAMETER" in bad.output


def test_config_names_the_author_and_keeps_tokens_private(run, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("CRYOPOOL_AUTHOR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    run("init", run.pop)
    run("config", "--global", "user.name", "Someone Else")
    run("config", "user.name", "Jane Doe")
    run("config", "user.email", "jane@lab.example")
    assert run("config", "user.name").output.strip() == "user.name=Jane Doe"
    run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS)
    assert Repository.open(run.pop).get_commit("HEAD").author == "Jane Doe <jane@lab.example>"
    run("config", "--unset", "user.name")  # falls back to the user's settings
    run("import", "tilt-series", inputs["ts2"], "--source", "lab", *TS)
    assert Repository.open(run.pop).get_commit("HEAD").author == "Someone Else"
    assert run("config", "colour", "blue", ok=False).exit_code == 1
    run("remote", "add", "central", "http://127.0.0.1:9", "--token", "s3cret")
    assert (Path(run.pop) / ".cryopool/config").stat().st_mode & 0o077 == 0  # a token is inside: owner only


def test_an_import_that_stores_nothing_new_says_so(run, inputs):
    run("init", run.pop)
    first = run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS).output
    again = run("import", "tilt-series", inputs["ts1"], "--source", "lab", "--name", "same_pixels", *TS).output
    assert "deduplicated" not in first and "deduplicated" in again


def test_a_mistake_is_corrected_and_nothing_is_lost(run, inputs):
    """Import with the wrong dose, remove the item, import it again corrected; reset back and forth via reflog."""
    run("init", run.pop)
    run("import", "tilt-series", inputs["ts1"], "--source", "lab", "--tilt-angles", "-12:12:3",
        "--dose-per-tilt", "30", "--defocus-um", "3")
    wrong = Repository.open(run.pop).resolve("HEAD")
    again = run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS, ok=False)
    assert "already exists" in again.output
    assert "cryopool rm item" in again.output  # the hint says how to correct it
    refused = run("rm", "item", "lab/nothing", ok=False)
    assert refused.exit_code == 1 and "no item" in refused.output
    run("rm", "item", "lab/TS_01")
    run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS)
    repo = Repository.open(run.pop)
    item = repo.get_record(find_item(repo, repo.population(), "lab/TS_01")[1], TiltSeries)
    assert item.exposure_e_per_angstrom2[0] == 3.0
    corrected = repo.resolve("HEAD")
    run("reset", wrong[:12])
    assert Repository.open(run.pop).resolve("HEAD") == wrong
    log = run("reflog").output.splitlines()
    assert log[0].startswith(wrong[:12]) and "reset" in log[0] and log[1].startswith(corrected[:12])
    run("reset", corrected[:12])  # the reflog brought it back
    assert Repository.open(run.pop).resolve("HEAD") == corrected and run("verify").exit_code == 0


def test_rm_refuses_an_item_that_particles_sit_in(run, inputs):
    run("init", run.pop)
    for ts in ("ts1", "ts2"):
        run("import", "tilt-series", inputs[ts], "--source", "lab", *TS)
    run("import", "species", "ribo", "--half1", inputs["half1"], "--half2", inputs["half2"],
        "--particles", inputs["particles"], "--diameter", "100")
    refused = run("rm", "item", "lab/TS_01", ok=False)
    assert refused.exit_code == 1 and "ribo" in refused.output
    run("rm", "species", "ribo")
    run("rm", "item", "lab/TS_01")
    assert list(Repository.open(run.pop).population().species) == []


def test_revert_undoes_one_commit_and_refuses_what_changed_since(run, inputs, tmp_path):
    run("init", run.pop)
    run("import", "tilt-series", inputs["ts1"], "--source", "lab", *TS)
    run("import", "tilt-series", inputs["ts2"], "--source", "lab", *TS)  # the commit to undo
    repo = Repository.open(run.pop)
    second = repo.resolve("HEAD")
    run("import", "species", "ribo", "--half1", inputs["half1"], "--half2", inputs["half2"],
        "--particles", write_particles(tmp_path / "p.star", particle_rows(["TS_01"])), "--diameter", "100")
    species_commit = Repository.open(run.pop).resolve("HEAD")
    run("revert", second[:12])
    repo = Repository.open(run.pop)
    now = repo.population()
    assert [k for k, _, _ in iter_items(repo, now)] == ["lab/TS_01"] and list(now.species) == ["ribo"]
    assert repo.get_commit("HEAD").parents[0].id != second  # a new commit on top, history kept
    assert "lab/TS_02" in [k for k, _, _ in iter_items(repo, repo.population(second))]
    run("revert", "HEAD")  # reverting the revert brings it back
    assert [k for k, _, _ in iter_items(repo, Repository.open(run.pop).population())] == ["lab/TS_01", "lab/TS_02"]
    run("rm", "species", "ribo")
    run("import", "species", "ribo", "--half1", inputs["half2"], "--half2", inputs["half1"],
        "--particles", write_particles(tmp_path / "q.star", particle_rows(["TS_02"])), "--diameter", "100")
    refused = run("revert", species_commit[:12], ok=False)
    assert refused.exit_code == 1 and "species ribo" in refused.output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_rate_and_eta_on_a_terminal_and_nothing_elsewhere(monkeypatch):
    from cryopool.cli import common
    now = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    out = _Terminal()
    with common.progress_bar(10, "work", stream=out) as bar:
        now[0] += 2
        bar.update(4)
    text = out.getvalue()
    # 4 of 10 done 2 s after the start: 2 per second, 6 left, 3 s to go
    assert "[#########" in text and " 40%" in text and "4/10" in text and "2.00/s" in text and "ETA 0:03" in text
    assert text.endswith("\n")
    quiet = io.StringIO()  # not a terminal (a pipe, a log file, CI): nothing at all
    with common.progress_bar(10, "work", stream=quiet) as bar:
        bar.update(4)
        bar.tick(100)
        bar.step("part")
    assert quiet.getvalue() == ""
    out = _Terminal()
    with common.progress_bar(None, "receiving", stream=out) as bar:
        bar.tick(3 * 1024 * 1024)
    assert "3.0 MiB done" in out.getvalue() and "/s" in out.getvalue()
    out = _Terminal()  # refine's form: which part is running, of how many
    bar = common.progress_bar(None, "iteration 1", stream=out)
    now[0] += 10
    bar.show(1, 4, "item lab_a/TS_02")
    bar.close()
    assert "1/4" in out.getvalue() and "· item lab_a/TS_02" in out.getvalue() and "ETA 0:30" in out.getvalue()
