"""The machinery of the typed settings: frozen dataclasses whose fields carry their own rule.

A settings class derives from :class:`Settings` and declares each field with :func:`setting`
(default, :class:`Rule`, help text). From the fields alone follow:

* the valid keys (:meth:`Settings.keys`) of a YAML section, an environment variable or a CLI;
* the checks: every value is checked by its field's rule when an instance is made (directly, by
  :meth:`Settings.from_mapping`, or from the command line), so there is no second list of rules;
  ``None`` is accepted for a field whose default is ``None`` ("not set");
* the command-line options (:func:`add_arguments` / :meth:`Settings.from_cli`) with their help and
  defaults;
* nested sections: a field whose default is itself a :class:`Settings` instance is read from a
  mapping of its own (``evaluation.options``).

Normalisation: an integer given for a float field becomes a float; a list becomes a tuple (the
instances are frozen). Errors are :class:`SettingsError` naming where (file and section, or the
command-line option) and what was expected.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

from nnunet_calibration.errors import UserError


class SettingsError(UserError):
    """A setting with an unknown key, a wrong type or a value out of range (the message says where)."""


@dataclass(frozen=True)
class Rule:
    """A value rule: ``check(value) -> bool`` and what is expected, in words ("a positive integer")."""

    check: Callable[[Any], bool]
    what: str
    #: the allowed values, when the rule is a choice (:func:`one_of`)
    choices: tuple = ()


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An int or a finite float (``.nan`` and ``.inf`` are not numbers here), never a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Rule(lambda v: is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a positive finite number")
NON_NEGATIVE = Rule(lambda v: is_number(v) and v >= 0, "a non-negative finite number")
UNIT_INTERVAL = Rule(lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
OPEN_UNIT_INTERVAL = Rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
HALF_OPEN_UNIT_INTERVAL = Rule(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty text")
ANY_TEXT = Rule(lambda v: isinstance(v, str), "a text")
OPTIONAL_TEXT = Rule(lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "a non-empty text or null")


def one_of(choices) -> Rule:
    choices = tuple(choices)
    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of {list(choices)}", choices)


def setting(default, rule: Rule | None, help: str = "", **meta):
    """A settings field: its default, its :class:`Rule` and its help text (shown by CLIs and docs).

    ``meta``: ``cli=False`` keeps the field out of :func:`add_arguments`; ``file=False`` makes it an
    attribute that is not a key of the file (set by code, e.g. the file's own path); ``type=float``: the
    command-line type of a field whose default is ``None``."""
    factory = default in (dict, list) or (callable(default) and not isinstance(default, type))
    kw = {"default_factory": default} if factory else {"default": default}
    return field(metadata={"rule": rule, "help": help, **meta}, **kw)


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


class Settings:
    """Base of the frozen settings dataclasses (see the module docstring)."""

    #: name of the section in messages ("training", "slurm", ...)
    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            d = _default(f)
            if isinstance(v, list):
                object.__setattr__(self, f.name, v := tuple(v))
            rule = f.metadata.get("rule")
            if rule is not None and not (v is None and d is None) and not rule.check(v):
                raise SettingsError(f"{self.SECTION + '.' if self.SECTION else ''}{f.name} must be {rule.what}, "
                                    f"got {v!r}")
            if isinstance(d, float) and is_int(v):
                object.__setattr__(self, f.name, float(v))
        self.check()

    def check(self) -> None:
        """Rules between fields (subclasses); raise :class:`SettingsError`."""

    # -- keys ------------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys a file (or an environment variable) may give: every field not marked ``file=False``."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("file", True))

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: _default(f) for f in fields(cls) if f.metadata.get("file", True)}

    def to_dict(self) -> dict:
        """The file's keys and values (nested sections as dicts)."""
        out = {}
        for k in self.keys():
            v = getattr(self, k)
            out[k] = v.to_dict() if isinstance(v, Settings) else (list(v) if isinstance(v, tuple) else v)
        return out

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, data: dict) -> dict:
        """Hook: defaults that depend on other given keys (``data`` holds only what was given)."""
        return data

    @classmethod
    def from_mapping(cls, data: Mapping | None, where: str | None = None, **code_fields):
        """An instance from the given keys (missing keys: defaults). ``where`` prefixes messages
        (e.g. ``"study.yaml: training"``); ``code_fields`` are fields set by code (``file=False``)."""
        where = where if where is not None else cls.SECTION
        label = where or "top level"
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SettingsError(f"{label} must be a mapping (key: value), got {data!r}")
        known = cls.keys()
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise SettingsError(f"{label}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        values = cls.prepare(dict(data))
        by_name = {f.name: f for f in fields(cls)}
        for k, v in list(values.items()):
            d = _default(by_name[k])
            if isinstance(d, Settings) and not isinstance(v, Settings):
                values[k] = type(d).from_mapping(v, f"{where}.{k}" if where else k)
        try:
            return cls(**values, **code_fields)
        except SettingsError as e:
            msg = str(e)
            if cls.SECTION and msg.startswith(cls.SECTION + "."):
                msg = msg[len(cls.SECTION) + 1:]
            raise SettingsError(f"{where}.{msg}" if where and " must be " in msg.split(":")[0] and
                                not msg.startswith(where) else (f"{where}: {msg}" if where else msg)) from None
        except TypeError as e:  # a required field missing
            raise SettingsError(f"{label}: {e}") from None

    @classmethod
    def from_cli(cls, args: argparse.Namespace, prefix: str = ""):
        """An instance from the options :func:`add_arguments` added (only those given on the command
        line; the others keep their defaults). Messages name the option (``--nll-eps``)."""
        given = {f.name: getattr(args, prefix + f.name) for f in fields(cls)
                 if f.metadata.get("cli", True) and f.metadata.get("file", True)
                 and getattr(args, prefix + f.name, None) is not None}
        given = cls.prepare(given)
        by_name = {f.name: f for f in fields(cls)}
        for k, v in given.items():
            rule = by_name[k].metadata.get("rule")
            if rule is not None and not rule.check(v):
                raise SettingsError(f"--{k.replace('_', '-')} must be {rule.what}, got {v!r}")
        return cls(**given)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Settings], prefix: str = "",
                  exclude: tuple = ()) -> None:
    """Add one ``--option`` per field of ``cls`` (help and default from the field); read back with
    ``cls.from_cli(args)``. Booleans with default False become flags; fields whose rule is
    :func:`one_of` get ``choices``. Every option's argparse default is None (= not given)."""
    for f in fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or not f.metadata.get("file", True):
            continue
        d = _default(f)
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if d is not None and not isinstance(d, (Settings, bool)):
            helptext += f" (default {d})"
        dest = prefix + f.name
        if isinstance(d, bool):
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=helptext)
        elif isinstance(d, Settings):
            continue
        else:
            typ = f.metadata.get("type") or (type(d) if d is not None else str)
            rule = f.metadata.get("rule")
            if rule is not None and rule.choices:
                parser.add_argument(flag, dest=dest, choices=rule.choices, default=None, help=helptext)
            else:
                parser.add_argument(flag, dest=dest, type=_cli_type(typ), default=None, help=helptext,
                                    metavar={int: "N", float: "X"}.get(typ, "TEXT"))


def _cli_type(typ):
    def convert(text: str):
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if typ is int else 'a number'}, "
                                             f"got {text!r}") from None
    convert.__name__ = typ.__name__
    return convert if typ in (int, float) else typ
