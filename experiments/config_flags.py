"""Config dataclasses as absl flags, and back: one flag per field, same name, same help.

    config_flags.define(config.DecodeConfig)          # at import, in an entry point
    decode = config_flags.update(workdir_decode)      # in main(): the flags given win

A flag's default and help come from the field (transformer/config.py); a flag
takes effect only where the user gives it, on the command line or in a
flagfile, so the value it replaces can come from anywhere: a preset, the
workdir a model was trained in, the dataclass default.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from absl import flags

Config = TypeVar("Config")


def define(
    cls: type,
    *,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    defaults: dict | None = None,
    extra_choices: dict[str, tuple] | None = None,
    note: str = "",
) -> None:
    """One absl flag per field of the dataclass `cls`, typed by its default.

    `only`: these fields alone (default: all); `skip`: fields without a flag.
    `defaults`: an entry point's own defaults, shown in the help (the base it
    passes to update() must hold them too). `extra_choices`: {field: values} a choice
    flag takes beyond the field's (such as {"dtype": ("auto",)}). `note` ends every
    help line (say where the value comes from when not given).
    """
    defaults, extra_choices = defaults or {}, extra_choices or {}
    for field in dataclasses.fields(cls):
        if field.name in skip or (only and field.name not in only):
            continue
        default = defaults.get(field.name, field.default)
        help_text = field.metadata.get("help", field.name) + note
        choices = field.metadata.get("choices")
        if choices:
            options = [*choices, *extra_choices.get(field.name, ())]
            flags.DEFINE_enum(field.name, default, options, help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)


def given(cls: type, *, skip: tuple[str, ...] = ()) -> dict:
    """{field: value} of the fields of `cls` whose flags the user gave."""
    values = flags.FLAGS
    return {
        f.name: values[f.name].value
        for f in dataclasses.fields(cls)
        if f.name not in skip and f.name in values and values[f.name].present
    }


def update(base: Config, *, skip: tuple[str, ...] = ()) -> Config:
    """`base` with the settings the user gave as flags, validated."""
    return dataclasses.replace(base, **given(type(base), skip=skip)).validate()
