"""Settings from a TOML file, the environment and flags, for `slmops fleet serve` and `slmops agent run`
(and the commands that read the same settings).

Precedence: flags > environment (`SLMOPS_FLEET_*`, `SLMOPS_AGENT_*`) > the config file > defaults.
The file is the one `--config` (or `$SLMOPS_FLEET_CONFIG` / `$SLMOPS_AGENT_CONFIG`) names, else a
default location (`<data_dir>/fleet.toml`, `<state_dir>/agent.toml`) when it exists. Its keys are the
settings' own names (the environment variables without their prefix, in lower case): any field of
the program's settings class works, so a field added there is a key of the file at once. The fleet's
settings are pydantic-settings classes; the agent's a `slmops_agent.settings_model.Settings` (an idle
agent does not load pydantic), which has the same surface (model_fields, model_validate, errors()).
Unknown keys are refused with the key's name, the nearest known one and the file; a value of the
wrong type names its key and where it came from. An environment variable with the program's prefix
that is no setting (a typo) is warned about, with the nearest setting's variable.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

S = TypeVar("S")  # a pydantic-settings class or a settings_model.Settings

_SECRET_WORDS = ("password", "token", "secret")


class SettingsError(ValueError):
    """Settings that cannot be used: the message is one line naming the key and its source."""


@dataclass(frozen=True)
class Loaded(Generic[S]):
    settings: S
    file: Path | None  # the config file read, if any
    sources: dict[str, str]  # setting -> where its value came from ("flag", "$VAR", the file, "default")
    warnings: list[str]  # misspelt environment variables

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every setting's value (secrets masked) and source, for `config show`."""
        settings: Any = self.settings
        values = settings.model_dump(mode="json")
        return {
            name: {"value": mask(name, values.get(name)), "source": self.sources.get(name, "default")}
            for name in type(settings).model_fields
        }


def prefix_of(cls: Any) -> str:
    return str(cls.model_config.get("env_prefix") or "")


def read_file(cls: Any, path: Path) -> dict[str, Any]:
    """The settings a TOML file gives; SettingsError for a file that cannot be read or parsed, or an
    unknown key (named, with the nearest known one)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from None
    known = list(cls.model_fields)
    for key in data:
        if key not in cls.model_fields:
            table = " (settings are top-level keys, not tables)" if isinstance(data[key], dict) else ""
            raise SettingsError(f"{path}: unknown setting {key!r}{_nearest(key, known)}{table}")
    return data


def misspelt_environment(cls: Any, environ: Mapping[str, str], *, also_known: tuple[str, ...] = ()) -> list[str]:
    """Warnings for variables with the settings' prefix that name no setting (nor one of `also_known`,
    variables of the same prefix read by something else), each with the nearest setting's variable."""
    prefix = prefix_of(cls).upper()
    names = [name.upper() for name in cls.model_fields]
    allowed = {prefix + name for name in names} | {v.upper() for v in also_known}
    return [
        f"{var} is not a setting of slmops and is ignored{_nearest(var.upper()[len(prefix) :], names, prefix)}"
        for var in sorted(environ)
        if var.upper().startswith(prefix) and var.upper() not in allowed
    ]


def load(
    cls: type[S],
    *,
    flags: Mapping[str, Any],
    config: Path | None = None,
    default_config: Callable[[dict[str, Any]], Path] | None = None,
    also_known_env: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> Loaded[S]:
    """The settings from flags (None: not given) > environment > config file > defaults.

    `config` is the file named by a flag or its variable; without it, `default_config(values)` (the
    flags and the environment so far, e.g. for the data folder) names a file read when it exists."""
    environ = os.environ if environ is None else environ
    given = {k: v for k, v in flags.items() if v is not None}
    env = _env_values(cls)
    path = config
    if path is None and default_config is not None:
        candidate = default_config({**env, **given})
        path = candidate if candidate.is_file() else None
    from_file = read_file(cls, path) if path is not None else {}
    sources = {k: str(path) for k in from_file}
    prefix = prefix_of(cls).upper()
    sources.update({k: f"${prefix}{k.upper()}" for k in env})
    sources.update({k: "flag" for k in given})
    try:
        settings = cls.model_validate({**from_file, **env, **given})  # type: ignore[attr-defined]
    except ValueError as exc:  # pydantic's ValidationError or settings_model's: both list errors()
        if not hasattr(exc, "errors"):
            raise
        raise SettingsError("bad settings: " + "; ".join(_problem(e, sources) for e in exc.errors())) from None
    return Loaded(settings, path, sources, misspelt_environment(cls, environ, also_known=also_known_env))


def _env_values(cls: Any) -> dict[str, Any]:
    """The settings the environment gives, read as the class reads them."""
    if hasattr(cls, "env_values"):
        return dict(cls.env_values())
    from pydantic_settings import EnvSettingsSource

    return dict(EnvSettingsSource(cls)())


def mask(name: str, value: Any) -> Any:
    """A setting's value as `config show` prints it: secrets and the passwords in URLs masked."""
    if value is None:
        return None
    if any(word in name for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    return value


def _problem(error: Any, sources: dict[str, str]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    msg = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a rule across settings (e.g. TLS off loopback): its message names them
        return msg
    source = sources.get(loc[0])
    where = f" (from {source})" if source else ""
    return f"{'.'.join(loc)}{where}: {msg}"


def _nearest(word: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.7)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def show(loaded: Loaded[Any], *, as_json: bool) -> None:
    """Print the effective settings (`slmops fleet|agent config show`): a table, or JSON."""
    import json

    effective = loaded.effective()
    if as_json:
        out = {"config_file": str(loaded.file) if loaded.file else None, "settings": effective}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    from slmops_cli.tables import print_table

    rows = [
        (name, "" if item["value"] is None else json.dumps(item["value"]), item["source"])
        for name, item in effective.items()
    ]
    print_table(f"effective settings (config file: {loaded.file or 'none'})", ("setting", "value", "from"), rows)
