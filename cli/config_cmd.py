"""``cryopool config``: who you are (user.name, user.email) and other settings, per repository or per user."""

from __future__ import annotations

import json

import click

from cryopool.repo.errors import InvalidInputError
from cryopool.repo.fsutil import write_atomic
from cryopool.repo.repository import read_user_config, user_config_path

from .common import Context, emit_json, handle_errors, json_option

__all__ = ["COMMANDS"]

KEYS = {"user.name": "your name, as commits record it", "user.email": "your e-mail, recorded beside the name"}


@click.command()
@click.argument("key", required=False)
@click.argument("value", required=False)
@click.option("--global", "user_level", is_flag=True, help="Your settings for every repository (not this one's).")
@click.option("--unset", is_flag=True, help="Remove KEY.")
@json_option
@click.pass_obj
@handle_errors
def config(obj: Context, key: str | None, value: str | None, user_level: bool, unset: bool, as_json: bool) -> None:
    """Show all settings, show KEY, or set KEY to VALUE (keys: user.name, user.email)."""
    repo = None if user_level else obj.repo()
    settings = read_user_config() if user_level else repo.config
    if key is not None and key not in KEYS:
        raise InvalidInputError("unknown setting", field="key", expected=", ".join(KEYS), found=key)
    section, _, name = (key or ".").partition(".")
    if value is not None or unset:
        if key is None:
            raise InvalidInputError("name the setting to change", field="key", expected=", ".join(KEYS))
        if unset:
            settings.get(section, {}).pop(name, None)
        else:
            settings.setdefault(section, {})[name] = value
        if repo is not None:
            repo.save_config()
        else:
            path = user_config_path()
            write_atomic(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode(), path.parent)
        return
    shown = {k: settings.get(k.split(".")[0], {}).get(k.split(".")[1]) for k in ([key] if key else KEYS)}
    if as_json:
        emit_json({"settings": shown, "scope": "user" if user_level else "repository"})
        return
    for k, v in shown.items():
        if v is not None or key:
            click.echo(f"{k}={v if v is not None else ''}")


COMMANDS = [config]
