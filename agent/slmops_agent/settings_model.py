"""A small declarative settings class: typed fields with bounds, read from keyword values and the
environment (`<env_prefix><NAME>`, any case), validated into errors that name each bad field.

The agent's settings are read at every start, idle or not; pydantic-settings (with pydantic, its
plugins' metadata scan and its sources' imports) held ~11 MiB of an idle agent's memory for that
(benchmarks/README.md, footprint). The fields here are the few kinds the agent uses: str, int,
float, bool, Path, Literal, and unions of them with None. The surface `slmops_cli.settings_files`
and the tests use is pydantic's (`model_fields`, `model_config`, `model_validate`, `model_dump`,
`model_copy`, an error with `errors()`), so one loader serves the fleet's pydantic settings and these.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

_NO_DEFAULT: Any = object()
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class FieldInfo:
    default: Any = _NO_DEFAULT
    default_factory: Callable[[], Any] | None = None
    description: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    repr: bool = True
    check: Callable[[Any], Any] | None = None  # value -> value; ValueError names what is wrong


def Field(
    default: Any = _NO_DEFAULT,
    *,
    default_factory: Callable[[], Any] | None = None,
    description: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    min_length: int | None = None,
    repr: bool = True,
    check: Callable[[Any], Any] | None = None,
) -> Any:
    """One setting: its default (or `default_factory`), bounds, and an extra `check`."""
    return FieldInfo(default, default_factory, description, ge, gt, le, min_length, repr, check)


class SettingsValidationError(ValueError):
    """Bad settings: `errors()` lists each as {"loc": (field,), "msg": ...} (loc () for a rule
    across fields); str() is one line naming them all."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self._problems = problems
        super().__init__("; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" if p["loc"] else p["msg"] for p in problems))

    def errors(self) -> list[dict[str, Any]]:
        return list(self._problems)


class Settings:
    """Subclasses declare `name: type = Field(...)` and may override `check_all` (rules across fields)."""

    env_prefix: ClassVar[str] = ""
    model_fields: ClassVar[dict[str, FieldInfo]] = {}
    model_config: ClassVar[dict[str, Any]] = {}
    _types: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hints = get_type_hints(cls)
        cls.model_fields = {n: v for n, v in vars(cls).items() if isinstance(v, FieldInfo)}
        cls._types = {n: hints[n] for n in cls.model_fields}
        cls.model_config = {"env_prefix": cls.env_prefix, "extra": "forbid"}

    def __init__(self, **values: Any) -> None:
        """The environment's values with `values` on top, validated."""
        self._validate({**self.env_values(), **values})

    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The settings the environment gives (variables `<env_prefix><NAME>`, any case)."""
        upper = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
        prefix = cls.env_prefix.upper()
        return {n: upper[prefix + n.upper()] for n in cls.model_fields if prefix + n.upper() in upper}

    @classmethod
    def model_validate(cls, data: Mapping[str, Any]) -> Any:
        """Settings from `data` alone (no environment)."""
        settings = cls.__new__(cls)
        settings._validate(dict(data))
        return settings

    def _validate(self, data: dict[str, Any]) -> None:
        problems = [{"loc": (k,), "msg": "Extra inputs are not permitted"} for k in data if k not in self.model_fields]
        for name, info in self.model_fields.items():
            if name in data:
                raw = data[name]
            elif info.default_factory is not None:
                raw = info.default_factory()
            else:
                raw = info.default
            try:
                value = _convert(raw, self._types[name], info)
                if info.check is not None:
                    value = info.check(value)
            except ValueError as exc:
                problems.append({"loc": (name,), "msg": str(exc)})
                continue
            object.__setattr__(self, name, value)
        if not problems:
            try:
                self.check_all()
            except ValueError as exc:
                problems.append({"loc": (), "msg": str(exc)})
        if problems:
            raise SettingsValidationError(problems)

    def check_all(self) -> None:
        """Rules across fields (and defaults derived from others); ValueError names what is wrong."""

    def model_dump(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.model_fields}
        if mode == "json":
            return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        return values

    def model_copy(self, update: Mapping[str, Any] | None = None) -> Any:
        """A copy with `update` applied (not validated, as pydantic's)."""
        other = copy.copy(self)
        for name, value in (update or {}).items():
            object.__setattr__(other, name, value)
        return other

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n, info in self.model_fields.items() if info.repr)
        return f"{type(self).__name__}({shown})"


def _convert(raw: Any, kind: Any, info: FieldInfo) -> Any:
    """`raw` as a value of `kind` within `info`'s bounds; ValueError in pydantic's words if it is not."""
    if raw is _NO_DEFAULT:
        raise ValueError("Field required")
    origin = get_origin(kind)
    if origin is Union or origin is types.UnionType:
        options = get_args(kind)
        if raw is None and type(None) in options:
            return None
        errors: list[str] = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(raw, option, info)
            except ValueError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ValueError(errors[0])
        raise ValueError(
            "Input should be " + " or ".join(dict.fromkeys(e.removeprefix("Input should be ") for e in errors))
        )
    if origin is Literal:
        for allowed in get_args(kind):
            if raw == allowed:
                return allowed
        raise ValueError("Input should be " + " or ".join(repr(a) for a in get_args(kind)))
    value = _scalar(raw, kind)
    if info.min_length is not None and len(value) < info.min_length:
        raise ValueError(f"String should have at least {info.min_length} characters")
    for bound, ok, words in (
        (info.ge, lambda v, b: v >= b, "greater than or equal to"),
        (info.gt, lambda v, b: v > b, "greater than"),
        (info.le, lambda v, b: v <= b, "less than or equal to"),
    ):
        if bound is not None and not ok(value, bound):
            raise ValueError(f"Input should be {words} {bound}")
    return value


def _scalar(raw: Any, kind: Any) -> Any:
    text = raw.strip() if isinstance(raw, str) else None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise ValueError("Input should be a valid boolean")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        try:
            return int(text) if text is not None else _fail()
        except ValueError:
            raise ValueError("Input should be a valid integer") from None
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(text) if text is not None else _fail()
        except ValueError:
            raise ValueError("Input should be a valid number") from None
    if kind is str:
        if isinstance(raw, str):
            return raw
        raise ValueError("Input should be a valid string")
    if kind is Path:
        if isinstance(raw, (str, os.PathLike)):
            return Path(raw)
        raise ValueError("Input should be a valid path")
    raise TypeError(f"settings of type {kind!r} are not supported")


def _fail() -> Any:
    raise ValueError
