"""Forms generated from a recipe's arguments dataclass: fields -> widgets, widget values -> the `jaxswift ...` flags
(only values that differ from the defaults), validation through the recipe's own parser, and a `--config` YAML.

No gradio here: the tab modules turn `FieldInfo`s into components, so this logic is tested without a browser."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import shlex
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxswift.errors import JaxswiftError


class FormError(JaxswiftError):
    """A form value the recipe would refuse; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    """One recipe's tab: `jaxswift COMMAND`, run as `python -m MODULE`, its flags the fields of ARGUMENTS
    ("module:Class"). `common` fields are shown first, the rest under "Advanced"; `choices` turn text fields into
    dropdowns (custom values still allowed: the parser decides); `paths` name the fields that must exist on disk
    ("dataset": dataset specs, "model": a model path unless it is a name, "file": a file or folder)."""
    key: str
    command: str
    module: str
    arguments: str
    common: tuple[str, ...]
    choices: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    paths: dict[str, str] = dataclasses.field(default_factory=dict)
    launches_run: bool = True  # False: the tab runs the recipe and shows its output (plan)

    def available(self) -> bool:
        """Whether the recipe module exists in this installation (the Eval tab waits for its recipe)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def arguments_class(self) -> type:
        module, _, name = self.arguments.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    kind: str  # bool | list | text
    scalar: type  # str | int | float | bool (the element type for lists)
    default: Any
    optional: bool
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def default_text(self) -> str:
        return value_text(self, self.default)


def _unwrap(hint) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def describe(cls: type, choices: dict[str, tuple[str, ...]] | None = None) -> list[FieldInfo]:
    """The dataclass's fields, in order, as form fields."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint, optional = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            default = None
        if typing.get_origin(hint) is list:
            kind, scalar = "list", (typing.get_args(hint) or (str,))[0]
        elif hint is bool and not optional:
            kind, scalar = "bool", bool
        else:
            kind, scalar = "text", hint if hint in (int, float, str, bool) else str
        out.append(FieldInfo(f.name, kind, scalar, default, optional, f.metadata.get("help", ""),
                             (choices or {}).get(f.name)))
    return out


def value_text(field: FieldInfo, value) -> Any:
    """How a value shows in the field's widget (a checkbox takes a bool, the rest text)."""
    if field.kind == "bool":
        return bool(value)
    if value is None:
        return ""
    if field.kind == "list":
        return " ".join(shlex.quote(str(v)) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def to_flags(fields: list[FieldInfo], values: dict[str, Any]) -> list[str]:
    """The flags that differ from the dataclass defaults, in field order."""
    flags = []
    for f in fields:
        if f.name not in values:
            continue
        value = values[f.name]
        if f.kind == "bool":
            if bool(value) != bool(f.default):
                flags += [f"--{f.name}", "true" if value else "false"]
            continue
        text = "" if value is None else str(value).strip()
        default = f.default_text
        if text == default or (f.scalar in (int, float) and _same_number(text, default)):
            continue
        if f.kind == "list":
            try:
                items = shlex.split(text)
            except ValueError as e:
                raise FormError(f"{f.name}: {e} (separate values with spaces, quote those that contain one)") from None
            if not items:
                raise FormError(f"{f.name}: give at least one value (default: {default or 'none'})")
            flags += [f"--{f.name}", *items]
        elif text == "" and f.default is not None and f.optional:
            raise FormError(f"{f.name}: empty is not a value the command line can pass; give a value "
                            f"(default {default})")
        elif text.startswith("-"):  # argparse would read `-1e-4` as a flag of its own
            flags.append(f"--{f.name}={text}")
        else:
            flags += [f"--{f.name}", text]
    return flags


def parse_flags(cls: type, flags: list[str]):
    """The recipe's own parser over the flags; its complaint (argparse's or the dataclass's) as a FormError."""
    from jaxswift.train.args import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_args(cls, flags)
    except SystemExit:  # argparse: a value of the wrong type, an unknown choice...
        lines = [line for line in err.getvalue().splitlines() if "error:" in line]
        message = lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue().strip()
        raise FormError(message.replace("argument ", "")) from None
    except JaxswiftError as e:
        raise FormError(str(e)) from None


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith(".") or text.endswith((".gguf", ".json", ".safetensors"))


def check_paths(spec: RecipeSpec, args) -> None:
    """The files the run would read exist (so a typo fails here, not minutes into the run)."""
    from jaxswift.data.formats import parse_dataset_spec, resolve_path

    for name, what in spec.paths.items():
        value = getattr(args, name, None)
        if value in (None, "", []):
            continue
        for item in value if isinstance(value, list) else [value]:
            item = str(item)
            if what == "dataset":
                try:
                    resolve_path(parse_dataset_spec(item)[0])
                except JaxswiftError as e:
                    raise FormError(f"{name}: {e}") from None
            elif what == "model" and not _looks_like_path(item) and not Path(item).exists():
                continue  # an embedded model or preset name: the recipe resolves it
            elif not Path(item).expanduser().exists():
                raise FormError(f"{name}: {item} does not exist")


def validate(spec: RecipeSpec, fields: list[FieldInfo], values: dict[str, Any]) -> tuple[list[str], Any]:
    """(flags, parsed arguments) for the form values; FormError naming the field otherwise."""
    flags = to_flags(fields, values)
    args = parse_flags(spec.arguments_class(), flags)
    check_paths(spec, args)
    return flags, args


def command_line(spec: RecipeSpec, flags: list[str]) -> str:
    return shlex.join(["jaxswift", spec.command, *flags])


def config_yaml(flags: list[str], args, fields: list[FieldInfo]) -> str:
    """The set flags as a `--config` file: the parsed values of the fields the flags name."""
    given = {flag.split("=", 1)[0] for flag in flags if flag.startswith("--")}
    named = [f.name for f in fields if f"--{f.name}" in given and f.name != "config"]
    data = {name: getattr(args, name) for name in named}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "# every value is the default\n"
