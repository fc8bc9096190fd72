"""Typed hyperparameters: one frozen dataclass per method, the single definition of its keys, types and defaults.

A method sets ``hyperparameters = <its dataclass>``: the class's ``defaults`` (what the config resolution starts
from, methods/base.py) are derived from the fields, in field order (the order of a config's keys, which its hash
depends on); ``self.hp`` is an instance, read as ``self.hp.ema_decay`` (a reader and
an IDE see the type and the default where the field is declared). Building it checks every value against its
field's type (``float`` takes a whole number, ``X | None`` takes null, ``Literal[...]`` names the choices) and
refuses a wrong one with a :class:`core.errors.UserError` naming the key. Values are kept as given (no conversion),
so the numbers a run computes do not change.

``hp["key"]`` reads a field too (checks that loop over several keys). A subclass method extends its parent's
dataclass and may re-declare a field to change its default; the field keeps its place.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Union

from core.errors import UserError


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(annotation, str(annotation))


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as read from YAML or a ``--set`` override) fits the type ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        return isinstance(value, (list, tuple)) and all(matches(v, item) for v in value)
    raise TypeError(f"no check for hyperparameter type {annotation!r}")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Base of the methods' hyperparameter dataclasses (subclasses are frozen dataclasses too)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default, in field order (a fresh copy of every list)."""
        values = {}
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                values[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                values[field.name] = field.default_factory()
            else:
                raise TypeError(f"{cls.__name__}.{field.name} has no default: every hyperparameter needs one")
        return values

    @classmethod
    def from_values(cls, values: Mapping[str, Any], method: str) -> "Hyperparameters":
        """The instance for ``values`` (every field's key present, e.g. defaults under a config's values); a value
        of the wrong type is a UserError."""
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            value, hint = values[field.name], hints[field.name]
            if matches(value, hint):
                continue
            if typing.get_origin(hint) is Literal:
                raise UserError(f"unknown method.{field.name} '{value}' for {method}",
                                where=f"known: {', '.join(map(str, typing.get_args(hint)))}")
            raise UserError(
                    f"method.{field.name}={value!r} for {method}: expected {_type_name(hint)}",
                    fix=f"e.g. method.{field.name}={cls.defaults()[field.name]!r} (the default)",
                )
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in {field.name for field in dataclasses.fields(self)}
