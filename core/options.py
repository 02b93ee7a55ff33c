"""One source of truth for the options of a job: each options dataclass field carries its metadata (help, CLI flag,
choices, group, whether the GUI shows it and how), and the CLI parser, the CLI-to-options mapping, the command line
a GUI form stands for and the GUI form itself are all generated from it.

    algorithm: str = field(default="flatquant", metadata=option(
        "layer-wise algorithm", choices=lambda: sorted(ALGORITHMS), group="algorithm",
        gui=GuiControl("algorithm", "dropdown", "algorithm")))

Rules of the generated CLI (``add_arguments``):
- the flag is ``--<field name>`` unless ``flag=`` names another (``--config`` for ``config_file``);
- a bool field with a flag: the flag sets the opposite of the field's default (``--no_ppl`` sets ``skip_ppl``);
  an ``Optional[bool]`` (None: the config's value) gets ``--x`` (True) and, when ``negation=`` is given, that flag
  for False (hidden from --help unless ``negation_help=``);
- ``choices`` is a callable that returns the registry (so it is read when the parser is built, never restated);
  the parser shows them but does not enforce them: the options' own check() refuses a bad value with one
  ``error:`` line, like every other bad input;
- ``multiple=True``: a comma-separated list of choices;
- ``internal=True``: no CLI flag (set by code: ``config``, a dict, comes from ``--config FILE``);
- ``cli_default=``: the CLI's value when the flag is absent, where it differs from the API's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

KEY = "flatquant_option"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "not given" for metadata values where None is a value


@dataclass(frozen=True)
class GuiControl:
    """How the GUI form shows one option. Plain data: flatgui builds the gradio component from it."""
    section: str  # the row of the form it sits in (flatgui.form.SECTIONS)
    widget: str  # dropdown | checkbox | number | text | multiselect
    label: str  # i18n key (flatgui.i18n.STRINGS) of its label
    info: Optional[str] = None  # i18n key of its help line
    name: Optional[str] = None  # the form's name for it when it differs (saved settings files use it)
    default: Any = UNSET  # the form's default when it differs (the GUI starts with a small CPU budget)
    none_value: Any = UNSET  # the form value that stands for the option's None (e.g. 0 = every layer)
    minimum: Optional[float] = None
    choice_label: Optional[str] = None  # i18n key of each choice's text, "{}" replaced by the choice


@dataclass(frozen=True)
class Option:
    help: str
    flag: Optional[str] = ""  # "" = --<field name>; None = no flag of its own (only ``negation``)
    negation: Optional[str] = None  # the flag that sets False (bools)
    negation_help: Optional[str] = None  # None: the negation is hidden from --help
    choices: Optional[Callable[[], Iterable[str]]] = None
    multiple: bool = False  # a comma-separated list of choices
    group: Optional[str] = None  # argparse group title
    metavar: Optional[str] = None
    internal: bool = False  # set by code, not a CLI flag
    cli_default: Any = UNSET
    config_key: bool = False  # overrides the config key of the same name (core.config.FlatQuantConfig)
    canonical: Optional[Callable[[Any], Any]] = None  # the value as the command line writes it
    gui: Optional[GuiControl] = None


def option(help: str, **kwargs) -> dict:
    """Field metadata: ``field(default=..., metadata=option("help", ...))``."""
    return {KEY: Option(help=help, **kwargs)}


def option_of(f: dataclasses.Field) -> Optional[Option]:
    return f.metadata.get(KEY)


def described_fields(cls) -> list[tuple[dataclasses.Field, Option]]:
    """Every field of ``cls`` with its Option, in declaration order; a field without one is an error (the test of
    each options class relies on this)."""
    out = []
    for f in dataclasses.fields(cls):
        opt = option_of(f)
        if opt is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no option(...) metadata")
        out.append((f, opt))
    return out


def choices_of(opt: Option) -> Optional[list[str]]:
    return None if opt.choices is None else list(opt.choices())


def value_type(cls, name: str) -> type:
    """The field's base type with Optional stripped: bool, int, float, str or list."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return list
    return origin if origin in (bool, int, float) else str


def flag_of(f: dataclasses.Field, opt: Option) -> Optional[str]:
    return None if opt.internal or opt.flag is None else (opt.flag or f"--{f.name}")


def cli_default(f: dataclasses.Field, opt: Option) -> Any:
    if opt.cli_default is not UNSET:
        return opt.cli_default
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def cli_fields(cls) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, o) for f, o in described_fields(cls) if not o.internal]


def _help(opt: Option, choices: Optional[list[str]]) -> str:
    """A single choice shows its choices in the metavar; a comma-separated list names them in the help."""
    return f"{opt.help} (comma-separated, from: {', '.join(choices)})" if choices and opt.multiple else opt.help


def add_arguments(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """Add every CLI option of ``cls`` to ``parser`` (dest = the field name; groups by ``Option.group``)."""
    groups: dict[str, Any] = {}
    for f, opt in cli_fields(cls):
        if f.name in skip:
            continue
        target = parser
        if opt.group:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group)
            target = groups[opt.group]
        default = cli_default(f, opt)
        flag = flag_of(f, opt)
        kind = value_type(cls, f.name)
        if kind is bool:
            if flag:
                sets = True if f.default is None else not f.default
                target.add_argument(flag, dest=f.name, action="store_true" if sets else "store_false",
                                    default=default, help=opt.help)
            if opt.negation:
                target.add_argument(opt.negation, dest=f.name, action="store_false", default=default,
                                    help=opt.negation_help or argparse.SUPPRESS)
            continue
        choices = choices_of(opt)
        metavar = opt.metavar or (("{" + ",".join(choices) + "}") if choices and not opt.multiple else None)
        target.add_argument(flag, dest=f.name, type=kind if kind in (int, float) else str, default=default,
                            metavar=metavar, help=_help(opt, choices))


def from_args(cls, args: argparse.Namespace, **overrides):
    """The options object a parsed command line stands for (fields without a flag keep their defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f, _ in cli_fields(cls) if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def canonical_value(opt: Option, value: Any) -> Any:
    if value is None:
        return None
    if opt.canonical is not None:
        return opt.canonical(value)
    if opt.multiple:
        items = value.split(",") if isinstance(value, str) else value
        return ",".join(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    return value


def canonical_values(obj) -> dict:
    """{field: value as the command line writes it} of an options object (comma lists joined, skip_layers sorted):
    two objects are the same job when these agree (and their resolved configs do)."""
    return {f.name: canonical_value(opt, getattr(obj, f.name)) for f, opt in described_fields(type(obj))}


def cli_args(cls, values: dict, implicit: Optional[dict] = None) -> list[str]:
    """The flags that give ``values`` ({field: value}) on the command line of ``cls``'s command. A value equal to
    what the command uses without its flag (the CLI default, or ``implicit[field]``, e.g. the config's value for a
    tri-state toggle) is left out; None is left out."""
    fields = {f.name: (f, o) for f, o in described_fields(cls)}
    implicit = implicit or {}
    argv: list[str] = []
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    for name in (n for n in fields if n in values):  # in the class's field order
        raw = values[name]
        f, opt = fields[name]
        if opt.internal:
            raise ValueError(f"{cls.__name__}.{name} has no CLI flag")
        value = canonical_value(opt, raw)
        base = implicit.get(name, cli_default(f, opt))
        if value is None or value == canonical_value(opt, base):
            continue
        flag = flag_of(f, opt)
        if value_type(cls, name) is bool:
            sets = True if f.default is None else not f.default
            chosen = flag if (flag and bool(value) == sets) else (opt.negation if not value else None)
            if chosen is None:
                raise ValueError(f"no flag sets {cls.__name__}.{name} to {value!r}")
            argv.append(chosen)
        elif isinstance(value, str) and (value == "" or value.startswith("-") or "," in value):
            argv.append(f"{flag}={value}")  # '=' form: a value starting with '-' (or empty) stays a value
        else:
            argv += [flag, str(value)]
    return argv
