"""Typed config loading: YAML + `dotted.key=value` overrides -> frozen dataclasses.

Each layer owns its dataclasses (kernels.model.ModelConfig, cluster.data.DataConfig, ...); this
module only assembles them and checks what the dataclasses cannot check themselves:
unknown keys (with the closest valid names suggested), types, `Literal[...]` choices, and keys
given twice in one YAML mapping. Range checks live in each dataclass (field metadata read by
kernels.config_fields.check_ranges in `__post_init__`).

`parse_job_args` is the one command-line parser of the jobs: `[TARGET] [CONFIG.yaml] [key.sub=value ...]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import textwrap
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key and what is accepted."""


class UsageError(ConfigError):
    """A malformed command line; the message names the argument and gives the usage."""


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Check/convert `value` to type `tp`; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not accepted; expected one of "
                              f"{', '.join(repr(c) for c in choices)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match any of "
                          f"{', '.join(_type_name(a) for a in get_args(tp))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a (nested) dict, validating every key."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=3)
            hint = f"; did you mean {', '.join(repr(prefix + '.' + c if prefix else c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint} "
                              f"(valid keys{' under ' + repr(prefix) if prefix else ''}: {', '.join(fields)})")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """'trainer.lr=1e-4' -> (['trainer', 'lr'], 0.0001); values parse as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. trainer.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 as a string; on the command line it is a number
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.split("."), value


def set_path(data: dict, path: list[str], value, where: str) -> None:
    """data[path[0]]...[path[-1]] = value, copying each section on the way (the caller's nested
    dicts are not changed); `where` starts the error when a key on the path is not a section."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
        node[part] = dict(child)
        node = node[part]
    node[path[-1]] = value


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    out = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        set_path(out, path, value, f"override {text!r}")
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first}); "
                         f"give each key once (YAML would keep only the last)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides are meant
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if seen:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load(cls, path: str | None = None, overrides: list[str] | tuple = ()):
    """Load `cls` from a YAML file (optional) plus dotted overrides."""
    data = load_yaml(path) if path else {}
    return build(cls, merge_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The command line of every job: `[TARGET] [CONFIG.yaml] [key.sub=value ...] [--options]`
# ---------------------------------------------------------------------------------------------

_OVERRIDE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
_CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclasses.dataclass
class JobArgs:
    """A parsed job command line, for `load(cls, args.config, args.overrides)`; `options` holds the
    job's own --options (argparse names)."""

    config: str | None
    overrides: list[str]
    target: str | None = None
    options: argparse.Namespace = dataclasses.field(default_factory=argparse.Namespace)
    verbose: bool = False  # --verbose (jobs that start Ray): Ray's full output on the console


class _JobArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised to the job's main (exit code 2 there), not sys.exit
        raise UsageError(f"{message} (usage: {self.usage}; see --help)")


def config_keys(cls) -> list[str]:
    """Top-level keys of a config dataclass; sections (nested dataclasses) as `name.*`."""
    hints = typing.get_type_hints(cls)
    return [f"{f.name}.*" if dataclasses.is_dataclass(hints.get(f.name)) else f.name
            for f in dataclasses.fields(cls) if f.init]


def parse_job_args(prog: str, argv: list[str] | None, config_cls, *, description: str = "",
                   target: str | None = None, target_help: str = "", config: bool = True,
                   options: typing.Sequence[tuple[tuple[str, ...], dict]] = (),
                   verbose_option: bool = False) -> JobArgs:
    """Parse `prog [TARGET] [CONFIG.yaml] [key.sub=value ...] [--options]`, the form of every job.

    prog: as shown in the usage ("posttrain sft"); argv: the arguments after it (None: sys.argv[1:]);
    config_cls: the dataclass the overrides address (--help lists its keys);
    target: the metavar of a leading, required argument (eval's run folder), or None;
    config: whether a CONFIG.yaml may be given (first, once; any file that exists, or a .yaml/.yml path);
    options: the job's own --options as (flags, argparse keyword arguments) pairs.
    verbose_option: accept -v/--verbose (JobArgs.verbose), for the jobs that start Ray (cluster.console).
    `--help` prints the usage and exits 0; a malformed line raises UsageError (a ConfigError) naming
    the argument. Unknown keys are rejected by `load` (through `build`), naming the key.
    """
    usage = " ".join([prog, *([target] if target else []), *(["[CONFIG.yaml]"] if config else []),
                      "[key.sub=value ...]", *(["[options]"] if options else []),
                      *(["[--verbose]"] if verbose_option else [])])
    rows = ([(target, target_help)] if target else []) + \
        ([("CONFIG.yaml", "a YAML config (optional: defaults otherwise)")] if config else []) + \
        [("key.sub=value", "set one config key; the value reads as YAML (1e-4, true, [a, b])")]
    keys = textwrap.fill(", ".join(config_keys(config_cls)), width=96, initial_indent="  ",
                         subsequent_indent="  ")
    epilog = "arguments:\n" + "\n".join(f"  {name:<15} {text}" for name, text in rows) + \
        f"\n\nconfig keys:\n{keys}"
    p = _JobArgumentParser(prog=prog, usage=usage, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    for flags, kwargs in options:
        p.add_argument(*flags, **kwargs)
    if verbose_option:
        p.add_argument("-v", "--verbose", action="store_true", dest="_verbose",
                       help="show Ray's full output (worker logs, Ray Data plans, Ray Train messages) and a "
                            "plain line per progress update instead of progress bars")
    ns = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    rest = list(ns.args)
    del ns.args
    verbose = bool(getattr(ns, "_verbose", False))
    if verbose_option:
        del ns._verbose

    def bad(arg: str, expected: str):
        return UsageError(f"argument {arg!r}: expected {expected} (usage: {usage}; see --help)")

    found_target = None
    if target:
        if not rest:
            raise UsageError(f"missing {target} (usage: {usage}; see --help)")
        found_target = rest.pop(0)
    config_path = None
    if config and rest and not _OVERRIDE_RE.match(rest[0]):
        if not (rest[0].endswith(_CONFIG_SUFFIXES) or os.path.isfile(rest[0])):
            raise bad(rest[0], "CONFIG.yaml (no such file) or key.sub=value")
        config_path = rest.pop(0)
    for arg in rest:
        if not _OVERRIDE_RE.match(arg):
            where = "; CONFIG.yaml comes first, once" if config and arg.endswith(_CONFIG_SUFFIXES) else ""
            raise bad(arg, f"key.sub=value{where}")
    return JobArgs(config_path, rest, found_target, ns, verbose)
