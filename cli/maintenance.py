"""``verify`` and ``gc``: keeping the repository honest and small."""

from __future__ import annotations

import sys

import click

from cryopool.repo.gc import DEFAULT_GRACE_S, gc as run_gc
from cryopool.repo.verify import verify as run_verify

from .common import Context, emit_json, handle_errors, human_bytes, json_option, progress_bar

__all__ = ["COMMANDS"]


@click.command()
@click.option("--quick", is_flag=True, help="Structure only: existence, records, references, DAG (no re-hashing).")
@click.option("--no-reflogs", is_flag=True, help="Start only from refs, not from reflog entries.")
@json_option
@click.pass_obj
@handle_errors
def verify(obj: Context, quick: bool, no_reflogs: bool, as_json: bool) -> None:
    """Recompute every reachable object's hash and check the version DAG. Exit 1 on any problem."""
    repo = obj.repo()
    with progress_bar(None, "re-hashing", enabled=not as_json) as bar:
        report = run_verify(repo, quick=quick, include_reflogs=not no_reflogs, progress=bar.update_to)
    if as_json:
        emit_json({"ok": report.ok, "quick": quick, "objects": report.objects, "records": report.records,
                   "commits": report.commits, "bytes_hashed": report.bytes_hashed, "seconds": round(report.seconds, 3),
                   "deferred": report.deferred, "temporary_bytes": report.temporary_bytes,
                   "problems": [{"object": p.object_id, "problem": p.problem, "referrers": list(p.referrers)}
                                for p in report.problems]})
    else:
        for p in report.problems:
            click.secho(f"BAD {p}", fg="red")
        speed = report.bytes_hashed / report.seconds / 2**20 if report.seconds > 0 else 0.0
        what = "structure checked" if quick else f"{human_bytes(report.bytes_hashed)} re-hashed ({speed:.0f} MiB/s)"
        verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
        click.echo(f"{verdict}: {report.objects} objects ({report.records} records, {report.commits} commits), "
                   f"{what} in {report.seconds:.2f} s"
                   + (f"; {report.deferred} chunk(s) of raw data still on the remote (partial clone)"
                      if report.deferred else ""))
        if report.temporary_bytes:
            click.echo(f"Note: {human_bytes(report.temporary_bytes)} in .cryopool/tmp left by interrupted "
                       "operations (not part of the repository); 'cryopool gc' removes it once it is an hour old, "
                       "'cryopool gc --now' at once (when nothing else writes).")
    if not report.ok:
        sys.exit(1)


@click.command()
@click.option("--grace", "grace_s", default=DEFAULT_GRACE_S, show_default=True, type=float,
              help="Never delete objects younger than this many seconds (protects running writers).")
@click.option("--now", is_flag=True, help="Grace period of zero (only when nothing else writes).")
@click.option("-n", "--dry-run", is_flag=True, help="Report what would be removed.")
@json_option
@click.pass_obj
@handle_errors
def gc(obj: Context, grace_s: float, now: bool, dry_run: bool, as_json: bool) -> None:
    """Remove objects that no ref, reflog entry or unfinished operation can reach."""
    report = run_gc(obj.repo(), grace_s=0.0 if now else grace_s, dry_run=dry_run)
    if as_json:
        emit_json(report.__dict__)
        return
    verb = "Would remove" if dry_run else "Removed"
    click.echo(f"{verb} {report.removed} unreachable object(s), {human_bytes(report.bytes_freed)}; "
               f"kept {report.reachable} reachable, {report.kept_young} too young to remove; "
               f"{report.tmp_removed} stale temporary file(s)")


COMMANDS = [verify, gc]
