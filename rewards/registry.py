"""The reward registry: one call, addressed by name or by `module:function`.

Every reward function is called with keywords only:

    fn(prompts=[...], completions=[...], <column>=[...], ..., completion_lengths=[...], <kwarg>=...)

(`def` or `async def`) -> list[float], one score per completion. The keywords are the batch's
prompts and completions, every extra dataset column of the batch by its name (e.g. `answer=`;
one entry per sample), `completion_lengths` (tokens per completion, passed by the GRPO job), and
the keyword arguments of the function's `RewardSpec`. So both of these work:

    def brevity(completions, **kwargs): ...                     # TRL's style
    def exact(prompts, completions, answer, **kwargs): ...

A function must be able to take every keyword of the call: name it as a parameter or take
`**kwargs` (the usual choice: datasets grow columns). `check_signature` says which parameter
or keyword does not fit, naming the function; the reward pool runs it when it is built (with
the columns when it knows them) and before each scoring call.

A config names a function either by its registered name (`math_answer`) or by an import
path (`my_project.rewards:brevity`). Built-ins register themselves when their module is
imported; `resolve` imports them on first use, so `import rewards.registry` stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

RewardFn = Callable[..., Any]  # returns list[float], or an awaitable of it

_REGISTRY: dict[str, RewardFn] = {}

# Modules whose import registers the built-in functions. Relative to this package so the
# package can be vendored under another name.
_BUILTIN_MODULES = ("math", "format", "length", "code", "model_based")
_builtins_loaded = False


# How every reward function is called (for error messages)
CALL_SIGNATURE = "fn(prompts=, completions=, <dataset columns>=, completion_lengths=, <spec kwargs>=) -> list[float]"
# Keywords every call passes, whatever the dataset
CALL_KEYWORDS = ("prompts", "completions")


class UnknownRewardError(LookupError):
    """A reward name that is neither registered nor a `module:function` path."""


class RewardSignatureError(TypeError, ValueError):
    """A reward function whose parameters cannot take the keyword call (see module doc)."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: `@register("brevity")` makes `fn` addressable as "brevity" from a config."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register: name must be a non-empty string without ':', got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register({name!r}): expected a callable, got {type(fn).__name__}")
        old = _REGISTRY.get(name)
        # Re-registering the same function (a module imported twice, e.g. under a test
        # runner) is harmless; two different functions under one name is a bug.
        if old is not None and _qualname(old) != _qualname(fn):
            raise ValueError(f"register: reward name {name!r} is already taken by {_qualname(old)}")
        _REGISTRY[name] = fn
        return fn

    return deco


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")
    _builtins_loaded = True


def registered_names() -> list[str]:
    """Sorted names of every registered reward function (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def load_path(spec: str, kind: str, what: str, error: type[Exception]) -> Any:
    """The object a `package.module:attr` path names (`module:Class.method` works too), or
    `error` naming the path: the loader of reward functions and of environments
    (actors/environments.py). kind/what word the messages ("reward", "function")."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise error(f"{kind} path {spec!r} must look like 'package.module:{what}'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise error(f"{kind} path {spec!r}: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error(f"{kind} path {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def resolve(spec: str | RewardFn) -> RewardFn:
    """A reward function from a registered name, a `module:function` path or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownRewardError(f"reward spec must be a name or 'module:function', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        obj = load_path(spec, "reward", "function", UnknownRewardError)
        if not callable(obj):
            raise UnknownRewardError(f"reward path {spec!r} is not callable ({type(obj).__name__})")
        return obj
    _load_builtins()
    try:
        return _REGISTRY[spec]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownRewardError(
            f"unknown reward {spec!r}; registered names: {known}; or give a 'module:function' path"
        ) from None


@dataclass(frozen=True)
class _Params:
    """What a signature can take: keyword-passable names, **kwargs, and the parameters that need
    a value (keyword-passable without default; positional-only without default)."""

    keywords: frozenset
    var_keyword: bool
    required: tuple
    positional_only: tuple


def _params(fn: Any) -> _Params | None:
    """None where Python cannot tell the signature (some builtins): nothing to check."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    ps = sig.parameters.values()
    kw_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return _Params(
        keywords=frozenset(p.name for p in ps if p.kind in kw_kinds),
        var_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps),
        required=tuple(p.name for p in ps if p.kind in kw_kinds and p.default is inspect.Parameter.empty),
        positional_only=tuple(p.name for p in ps if p.kind is inspect.Parameter.POSITIONAL_ONLY
                              and p.default is inspect.Parameter.empty))


def check_signature(fn: RewardFn, name: str, kwargs: Iterable[str] = (),
                    columns: Iterable[str] | None = None, required_ok: bool = False) -> None:
    """RewardSignatureError, naming `name` and the parameter, unless `fn` can take the call
    fn(prompts=, completions=, **columns, **kwargs).

    columns: the dataset columns of the call (completion_lengths included when passed); None
    when not known yet (building a pool): then only prompts, completions and the kwargs are
    checked, and required parameters other than those are taken to be columns to come.
    required_ok: only check that every keyword of the call is accepted (some columns are known,
    the rest are still to come), not that every required parameter gets a value.
    """
    p = _params(fn)
    if p is None:
        return
    who = f"reward {name!r}"
    if p.positional_only:
        raise RewardSignatureError(
            f"{who}: parameter {p.positional_only[0]!r} is positional-only, but reward functions are "
            f"called with keywords only: {CALL_SIGNATURE}")
    kwargs = list(kwargs)
    cols = None if columns is None else list(columns)
    for key in [*CALL_KEYWORDS, *(cols or []), *kwargs]:
        if key in p.keywords or p.var_keyword:
            continue
        what = ("a kwarg of the reward spec" if key in kwargs else "a dataset column" if cols and key in cols
                else "passed on every call")
        raise RewardSignatureError(
            f"{who}: takes no parameter {key!r} ({what}) and no **kwargs; reward functions are called "
            f"as {CALL_SIGNATURE}: add {key!r} or **kwargs to its parameters")
    if cols is not None and not required_ok:
        given = {*CALL_KEYWORDS, *cols, *kwargs}
        missing = [r for r in p.required if r not in given]
        if missing:
            hint = "give it a default or add the column"
            if p.var_keyword and not set(CALL_KEYWORDS) & p.keywords:
                hint = "reward functions are called with keywords: name its first parameters prompts and completions"
            raise RewardSignatureError(
                f"{who}: parameter {missing[0]!r} gets no value: it is neither a dataset column "
                f"({', '.join(sorted(cols)) or 'none'}) nor a kwarg of the reward spec; {hint}")


@dataclass(frozen=True)
class RewardSpec:
    """One reward term of a run: which function, its weight in the total, its keyword arguments.

    name_or_path: a registered name or 'module:function'.
    weight: the term's weight in the weighted sum (may be negative or 0 = logged only).
    kwargs: extra keyword arguments given to the function on every call (plain data, so it
        travels through YAML and Ray).
    label: the term's key in results and metrics; defaults to name_or_path. Give one when two
        terms use the same function with different kwargs.
    """

    name_or_path: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        n = self.name_or_path
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"RewardSpec.name_or_path must be a non-empty string, got {n!r}")
        if ":" in n:
            mod, _, attr = n.partition(":")
            if not mod.strip() or not attr.strip():
                raise ValueError(f"RewardSpec.name_or_path {n!r}: a path must look like 'package.module:function'")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"RewardSpec.weight must be a finite number, got {w!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"RewardSpec.kwargs must be a mapping of keyword arguments, "
                             f"got {type(self.kwargs).__name__}")
        bad = [k for k in self.kwargs if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"RewardSpec.kwargs keys must be identifiers, got {bad!r}")
        if self.label is not None and (not isinstance(self.label, str) or not self.label.strip()):
            raise ValueError(f"RewardSpec.label must be a non-empty string or None, got {self.label!r}")
        object.__setattr__(self, "name_or_path", n.strip())
        object.__setattr__(self, "weight", float(w))
        object.__setattr__(self, "kwargs", dict(self.kwargs))  # a private copy; plain dict pickles

    @property
    def key(self) -> str:
        """The name of this term in results and metrics."""
        return self.label or self.name_or_path

    @classmethod
    def from_config(cls, obj: "RewardSpec | str | Mapping[str, Any]") -> "RewardSpec":
        """From YAML: `"math_answer"` or `{name: math_answer, weight: 0.5, kwargs: {...}, label: ...}`.

        `name` and `name_or_path` are synonyms.
        """
        if isinstance(obj, RewardSpec):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"reward spec must be a string or a mapping, got {type(obj).__name__}")
        d = dict(obj)
        if "name" in d and "name_or_path" in d:
            raise ValueError("reward spec: give either 'name' or 'name_or_path', not both")
        name = d.pop("name", d.pop("name_or_path", None))
        if name is None:
            raise ValueError(f"reward spec {obj!r}: missing 'name' (a registered name or 'module:function')")
        allowed = {"weight", "kwargs", "label"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ValueError(f"reward spec {name!r}: unknown keys {extra}; accepted: name, weight, kwargs, label")
        return cls(name, d.get("weight", 1.0), d.get("kwargs") or {}, d.get("label"))

    def resolve(self) -> RewardFn:
        return resolve(self.name_or_path)
