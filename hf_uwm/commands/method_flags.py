"""The method flags, generated from the registry: `--method`, the shared `--alpha` and `--towers`, and a
flag for every declared setting of every registered method (an installed plugin's included).

Each setting's parse rule, help and sweep rule come from its `setting(...)` metadata; its default is
read from the method's settings dataclass. A flag of a setting the chosen method does not have is
refused, and the config's refusals are reworded in flags (`--goal none`, not `goal=None`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from ..settings import declaring_class, setting_info
from .common import positive

NONE = "none"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting_flags() -> dict[str, list]:
    """Every declared setting of every registered method -> the methods that have it, in registry order."""
    from ..methods import get_method, method_names

    flags: dict[str, list] = {}
    for method in method_names():
        for field in dataclasses.fields(get_method(method).settings_class):
            flags.setdefault(field.name, []).append(method)
    return flags


def add_method_args(parser, *, default_method: str, grid: bool = False):
    """--method, --alpha, --towers and the settings' flags, one argument group per declaring settings class."""
    from ..config import UWMConfig
    from ..methods import get_method, method_names

    names = method_names()
    parser.add_argument("--method", "--score", dest="method", default=default_method, choices=names,
                        metavar="METHOD", help=f"the editing method, one of {', '.join(names)} (default "
                                               f"{default_method}; each is described below; --score is its former "
                                               "name)")
    alpha = UWMConfig.__dataclass_fields__["alpha"].default
    parser.add_argument("--alpha", type=float, default=[alpha] if grid else alpha, **({"nargs": "+"} if grid else {}),
                        help=f"{setting_info(UWMConfig, 'alpha').help} (default {alpha:g})")
    parser.add_argument("--towers", default="text,vision", help="towers to edit: text, vision or text,vision")
    groups: dict[type, list[str]] = {}
    flags = setting_flags()
    for name, methods in flags.items():
        groups.setdefault(declaring_class(get_method(methods[0]).settings_class, name), []).append(name)
    for declaring, members in groups.items():
        users = [m for m in names if issubclass(get_method(m).settings_class, declaring)]
        group = parser.add_argument_group(f"settings of {', '.join(users)}")
        for name in members:
            group.add_argument(flag(name), dest=name, default=None, **_argument(name, flags[name], grid))


def _argument(name: str, methods: list[str], grid: bool) -> dict:
    from ..methods import get_method

    settings_class = get_method(methods[0]).settings_class
    info = setting_info(settings_class, name)
    field = settings_class.__dataclass_fields__[name]
    none = f"; 'none': {info.none}" if info.none else ""
    kwargs = {"type": _parser(info, field), "help": f"{info.help} ({_defaults_text(name, methods, info)}{none})"}
    if info.choices:
        kwargs["choices"] = info.choices
    if grid and info.grid:
        kwargs["nargs"] = "+"
    return kwargs


def _parser(info, field):
    if info.positive:
        return positive
    if info.none is not None:
        return _number_or_none(info.example or "a number")
    kind = _kind(field)
    return _boolean if kind is bool else kind


def _kind(field) -> type:
    """bool, int, float or str, from the field's annotation (a string under `from __future__ import annotations`)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    for kind in (bool, int, float):
        if re.search(rf"\b{kind.__name__}\b", annotation):
            return kind
    return str


def _defaults_text(name: str, methods: list[str], info) -> str:
    """The default, read from each method's settings dataclass ('default 40'; per method where they differ)."""
    from ..methods import get_method

    values = {m: getattr(get_method(m).settings_class(), name) for m in methods}
    shown = {m: _shown(value, info) for m, value in values.items()}
    if len(set(shown.values())) == 1:
        return f"default {next(iter(shown.values()))}"
    return "default " + ", ".join(f"{value} for {m}" for m, value in shown.items())


def _shown(value, info) -> str:
    if value is None and info.family_default:
        from ..families import FAMILIES

        per_family = ", ".join(f"{spec.name} {getattr(spec, info.family_default):g}" for spec in FAMILIES.values())
        return f"the model family's ({per_family})"
    if value is None:
        return f"none: {info.none}" if info.none else "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _number_or_none(example: str):
    def parse(text: str):
        if text.lower() == NONE:
            return NONE
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {example}, or 'none'; got {text!r}") from None

    return parse


def given_settings(args) -> dict:
    """The settings given as flags; for a grid, the value to calibrate with (the first, or the most of a
    setting that a sweep re-selects downwards from, such as rounds)."""
    from ..methods import get_method

    given = {}
    for name, methods in setting_flags().items():
        value = getattr(args, name, None)
        if isinstance(value, list):
            most = setting_info(get_method(methods[0]).settings_class, name).calibrate_most
            value = max(value) if most else value[0]
        if value is not None:
            given[name] = None if value == NONE else value
    return given


def check_method_flags(args):
    """Refuse flags the chosen method would ignore: `--tau 0.05` must not pass silently into another method."""
    from ..methods import get_method
    from ..settings import setting_names

    own = setting_names(get_method(args.method).settings_class)
    flags = setting_flags()
    foreign = [name for name in flags if getattr(args, name, None) is not None and name not in own]
    if not foreign:
        return
    its = ", ".join(flag(name) for name in own) or "none"
    # An iterative method sets its strength itself, where UWM takes τ: say so to whoever mixes them up.
    why = (f" {args.method} sets its own strength: drop --tau, or add --method ratio for UWM as published."
           if "tau" in foreign and "rounds" in own else "")
    raise ValueError(f"{', '.join(flag(n) for n in foreign)}: not a setting of --method {args.method} (its settings: "
                     f"{its}).{why}")


_VALUE = r"'[^']*'|None|True|False|-?[\d.]+(?:e-?\d+)?"


def in_flags(message: str) -> str:
    """A config refusal in the words of the command line: `UWMConfig.goal=None` and `goal=None` read `--goal none`."""
    from ..config import SHARED_FIELDS

    flagged = set(SHARED_FIELDS) - {"text_targets", "vision_targets", "shared_budget", "extra"}   # no flags of their own
    names = sorted(set(setting_flags()) | flagged, key=len, reverse=True)

    def reword(match):
        value = match.group(2)
        value = value.strip("'") if value.startswith("'") else value.lower() if value in ("None", "True", "False") \
            else value
        return f"{flag(match.group(1))} {value}"

    return re.sub(rf"(?:UWMConfig\.)?\b({'|'.join(names)})=({_VALUE})", reword, message)


def config_from_args(args, **overrides):
    """The `UWMConfig` the flags ask for; its refusals read in flags."""
    from ..config import UWMConfig

    towers = {t.strip() for t in args.towers.split(",")}
    if not towers or towers - {"text", "vision"}:
        raise ValueError(f"--towers takes text, vision or text,vision; got {args.towers!r}.")
    settings = dict(method=args.method, alpha=args.alpha, batch_size=args.batch_size, seed=args.seed,
                    text_targets=None if "text" in towers else [], vision_targets=None if "vision" in towers else [])
    settings.update(given_settings(args), **overrides)
    _warn_alpha(args.alpha)
    try:
        return UWMConfig(**settings)
    except ValueError as err:
        raise ValueError(in_flags(str(err))) from None


def _warn_alpha(alpha):
    """A factor outside [-1, 1] makes the chosen weights larger than training left any: allowed, never silent."""
    import warnings

    for value in alpha if isinstance(alpha, list) else [alpha]:
        if abs(value) > 1:
            warnings.warn(f"--alpha {value:g} multiplies each selected weight by {value:g}, beyond the [-1, 1] of "
                          "negating (-1) or pruning (0): the model sees weights larger than it was trained with. "
                          "Use it only on purpose.", stacklevel=2)


def method_command(commands, name: str, help: str, default_method: str):
    """The subparser of a command that calibrates (edit, sweep): MODEL, calibration pairs and the method flags;
    its epilog lists every method."""
    from .common import data_args

    parser = commands.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=methods_epilog(default_method))
    parser.add_argument("model", metavar="MODEL")
    data_args(parser, "--data", "calibration pairs", "train")
    return parser


def methods_epilog(default: str) -> str:
    """Every registered method with its purpose, the default first and marked."""
    import textwrap

    from ..methods import get_method, method_names

    lines = ["methods (--method):"]
    for name in sorted(method_names(), key=lambda n: n != default):
        mark = " (default)" if name == default else ""
        lines.append(textwrap.fill(f"{name}{mark}: {get_method(name).help}", width=100, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)
