"""Settings that declare themselves: the base of a method's settings and the field that carries its metadata.

Each setting is a dataclass field made by `setting(...)`, which records, beside its default, the
help text, how the command line parses it, its symbol in tables and whether a sweep may grid over
it. The command line, sweeps and model cards read these fields, so a new setting is written once.

A leaf module: it imports nothing of hf_uwm, so the config and every method can depend on it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

_KEY = "hf_uwm"


@dataclass(frozen=True)
class SettingInfo:
    """What a setting says about itself (`setting(...)` documents each field)."""

    help: str = ""
    symbol: str | None = None
    grid: bool = False
    calibrate_most: bool = False
    choices: tuple | None = None
    positive: bool = False
    none: str | None = None
    example: str | None = None
    family_default: str | None = None


def setting(default, help: str, *, symbol: str | None = None, grid: bool = False, calibrate_most: bool = False,
            choices=None, positive: bool = False, none: str | None = None, example: str | None = None,
            family_default: str | None = None):
    """A dataclass field of a method's settings, with what the command line, sweeps and cards need.

    `help`: one line for `--help` (the default is appended from the dataclass, never written here);
    `symbol`: its short name in tables and plots (τ, λ...); `grid`: a sweep takes several values;
    `calibrate_most`: a sweep calibrates the largest of them once and re-selects the others from it;
    `choices`: the allowed strings; `positive`: a whole number ≥ 1; `none`: what `None` means, when
    a user may ask for it (`--goal none`), with `example` describing a valid value for the error;
    `family_default`: the model family's attribute that `None` stands for (written out when saved).
    """
    info = SettingInfo(help=help, symbol=symbol, grid=grid, calibrate_most=calibrate_most, choices=None if choices is None else tuple(choices),
                       positive=positive, none=none, example=example, family_default=family_default)
    return dataclasses.field(default=default, metadata={_KEY: info})


def setting_info(settings, name: str) -> SettingInfo:
    """The metadata of setting `name` of a settings dataclass (or instance); a subclass that only changes
    a default inherits its base's. A plain field (no `setting(...)`) gets empty metadata."""
    cls = settings if isinstance(settings, type) else type(settings)
    for klass in cls.__mro__:
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and _KEY in found.metadata:
            return found.metadata[_KEY]
    if name not in getattr(cls, "__dataclass_fields__", {}):
        raise KeyError(f"{cls.__name__} has no setting {name!r}.")
    return SettingInfo()


def setting_names(settings) -> tuple[str, ...]:
    """The fields of a method's settings (its dataclass or an instance of it)."""
    return tuple(f.name for f in dataclasses.fields(settings))


def declaring_class(settings_class: type, name: str) -> type:
    """The base-most class of `settings_class` that declares `name` (where its metadata was written)."""
    return next(klass for klass in reversed(settings_class.__mro__)
                if name in getattr(klass, "__dataclass_fields__", {}))


@dataclass
class MethodSettings:
    """Base of a method's own settings; subclasses are dataclasses of `setting(...)` fields that check
    them in `__post_init__` with `check`. `saved_defaults` are what a config saved whole before a
    field existed had in effect (a later release may give that field a new default); a dict that
    lacks other settings too (written by hand) gets today's defaults."""

    saved_defaults: typing.ClassVar[dict] = {}

    def check(self, name: str, ok: bool, allowed: str):
        check_field(self, name, ok, allowed)


def check_field(owner, name: str, ok: bool, allowed: str):
    """Refuse `owner.name` unless `ok`, naming the field as the user writes it (`UWMConfig.<name>`)."""
    if not ok:
        raise ValueError(f"UWMConfig.{name}={getattr(owner, name)!r} is invalid: {allowed}.")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
