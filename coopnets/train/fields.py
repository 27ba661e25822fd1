"""Settings checked against their declared types: dataclass fields and a callable's signature.

Every settings path (``TrainConfig`` from flags or YAML, ``--recipe-opt`` into a recipe's
config dataclass, ``--model-kwargs`` into a timm model's ``__init__``) goes through
:func:`type_problem`, so a bad value is one sentence naming the setting, the value and
what it must be, before anything is built or written.

Example:
    >>> from dataclasses import dataclass
    >>> from typing import List, Optional
    >>> @dataclass
    ... class Settings:
    ...     epochs: int = 1
    ...     lr: float = 0.1
    ...     leader: Optional[str] = None
    ...     weights: Optional[List[float]] = None
    >>> field_problems(Settings, {"epochs": "ten", "lr": [0.1, 0.2], "leader": None, "weights": [1, 0.5]})
    ["epochs must be an int (got 'ten')", 'lr must be a number (got [0.1, 0.2])']
    >>> type_problem(True, int), type_problem(3, float), describe(Optional[List[float]])
    ('must be an int (got True)', None, 'a list of numbers or None')
"""
from __future__ import annotations

import collections.abc
import inspect
import numbers
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional

_NONE = type(None)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of type ``tp`` (ints count as floats; types it cannot judge pass)."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.TypeVar)):
        return True
    origin, args = _origin(tp), typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is _NONE or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    if origin is collections.abc.Callable or tp is Callable:
        return callable(value)
    if isinstance(tp, type) and origin is None:  # an instance, or (a layer given as its class) a subclass
        return isinstance(value, tp) or (isinstance(value, type) and issubclass(value, tp))
    return True  # Type[...], protocols, generics it cannot judge


def describe(tp: Any) -> str:
    """``tp`` in words: ``an int``, ``a number``, ``a list of numbers or None``...

    Example:
        >>> describe(float), describe(typing.Dict[str, int])
        ('a number', 'a mapping')
    """
    origin, args = _origin(tp), typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        words = [describe(a) for a in args if a is not _NONE]
        return " or ".join(words + (["None"] if _NONE in args else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    simple = {bool: "True or False", int: "an int", float: "a number", str: "a string", _NONE: "None"}
    if tp in simple:
        return simple[tp]
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if args and args[0] in (int, float, str, bool):
            return "a list of " + {int: "ints", float: "numbers", str: "strings", bool: "booleans"}[args[0]]
        return "a list"
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def type_problem(value: Any, tp: Any) -> Optional[str]:
    """``"must be <tp in words> (got <value>)"`` when ``value`` does not fit ``tp``, else ``None``."""
    return None if fits(value, tp) else f"must be {describe(tp)} (got {value!r})"


def field_types(cls: type) -> Dict[str, Any]:
    """The resolved annotations of a dataclass (or any class); unresolvable ones stay strings (unchecked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward references to names that are not importable
        return dict(getattr(cls, "__annotations__", {}))


def field_problems(cls: type, values: Mapping[str, Any], name: Callable[[str], str] = str) -> List[str]:
    """One sentence per value of ``values`` whose type is not its field's (``name`` spells the setting)."""
    types = field_types(cls)
    return [f"{name(k)} {problem}" for k, v in values.items()
            if k in types and (problem := type_problem(v, types[k])) is not None]


def signature_problems(fn: Callable, values: Mapping[str, Any], what: str) -> List[str]:
    """Problems of keyword arguments ``values`` for ``fn``: unknown names (when ``fn`` takes no
    ``**kwargs``) and values whose type is not the parameter's annotation (or, unannotated, its
    default's type).

    Example:
        >>> def f(a: float = 0.0, b=1): ...
        >>> signature_problems(f, {"a": "lots", "b": 2.5, "c": 1}, "f")
        ["f takes no option 'c' (valid: a, b)", "a must be a number (got 'lots')"]
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001
        hints = {}
    problems: List[str] = []
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    unknown = [k for k in values if k not in named]
    if unknown and not open_kwargs:
        problems += [f"{what} takes no option {k!r} (valid: {', '.join(named)})" for k in unknown]
    for key, value in values.items():
        if key not in named:
            continue
        param = params[key]
        tp = hints.get(key, param.annotation)
        if tp is inspect.Parameter.empty or isinstance(tp, str):
            default = param.default  # unannotated: a number default takes numbers, a bool default booleans
            tp = bool if isinstance(default, bool) else float if isinstance(default, (int, float)) else Any
        problem = type_problem(value, tp)
        if problem:
            problems.append(f"{key} {problem}")
    return problems
