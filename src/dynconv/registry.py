"""One registry class for everything built by name: models, datasets, losses, layer kinds.

A :class:`Registry` maps a name to a builder (a function or a class) with optional metadata
(a model's ``task``). Builders are registered explicitly, by a decorator in the module that
defines them; a package's ``__init__`` imports those modules, so importing the package
registers its builders (no module scanning, no entry points). A builder's options are read
from its signature, so a config can be checked before anything is built.

Example::

    LOSSES = Registry("loss")

    @LOSSES.register("l1")
    class L1Loss(nn.Module): ...

    LOSSES.names()                   # ('l1',)
    LOSSES.options("l1").names       # ('weight', 'prediction', 'target')
    LOSSES.build("l1", weight=0.5)   # L1Loss(weight=0.5)
    LOSSES.build("l2")               # UnknownNameError: loss must be one of ['l1'], got unknown loss 'l2'
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

__all__ = ["Registry", "Options", "UnknownNameError", "signature_options"]

B = TypeVar("B", bound=Callable[..., Any])


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered. A ``ValueError`` (a bad config value) and a ``KeyError``
    (``registry[name]`` behaves like a dict lookup); the message names the registry, the
    name and the registered ones."""

    __str__ = BaseException.__str__  # KeyError would quote the message


@dataclass(frozen=True)
class Options:
    """The keyword options a builder accepts, read from its signature.

    ``defaults`` maps each option to its default (``inspect.Parameter.empty`` when it has
    none); ``var_keyword`` is True when the builder also takes ``**kwargs`` (then any key is
    accepted).
    """

    defaults: Mapping[str, Any]
    var_keyword: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(n for n, d in self.defaults.items() if d is inspect.Parameter.empty)

    def accepts(self, key: str) -> bool:
        return self.var_keyword or key in self.defaults

    def unknown(self, keys: Iterable[str]) -> list[str]:
        """The keys not accepted, sorted (empty when the builder takes ``**kwargs``)."""
        return sorted(k for k in keys if not self.accepts(k))


def signature_options(builder: Callable[..., Any], skip: Iterable[str] = ()) -> Options:
    """:class:`Options` of any callable (for a class: its ``__init__`` without ``self``)."""
    params = inspect.signature(builder).parameters.values()
    skip = set(skip)
    defaults = {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    }
    return Options(MappingProxyType(defaults), any(p.kind is p.VAR_KEYWORD for p in params))


class Registry:
    """Name -> builder, with per-name metadata and options read from the builder's signature.

    Args:
        kind: what is registered, singular (``'model'``); it names the registry in errors.
        positional: the builder arguments the caller passes positionally (a dataset's
            ``split``, a layer's channels); they are not options.
        meta: metadata every registration must give, each key with its allowed values
            (``{'task': TASKS}``), or ``None`` for any value.

    Reads like a read-only dict (``name in registry``, ``registry[name]``, iteration in
    registration order, ``len``), so the old module-level dicts (``MODELS``, ``DATASETS``,
    ``LOSSES``) are registries now.
    """

    def __init__(
        self, kind: str, *, positional: Iterable[str] = (), meta: Mapping[str, Iterable[Any] | None] | None = None
    ) -> None:
        self.kind = kind
        self.positional = tuple(positional)
        self._meta_schema = {k: (tuple(v) if v is not None else None) for k, v in (meta or {}).items()}
        self._builders: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, Mapping[str, Any]] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self._builders)})"

    # -- registration ----------------------------------------------------------------------
    def register(self, name: str, builder: B | None = None, /, **meta: Any) -> Any:
        """Register ``builder`` under ``name``; without ``builder``, a decorator that does.

        ``meta`` must give exactly the keys the registry was created with (checked here, so a
        bad value fails at the decorator). Registering the same builder twice is a no-op;
        another builder under a taken name raises ``ValueError``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")
        missing = sorted(set(self._meta_schema) - set(meta))
        extra = sorted(set(meta) - set(self._meta_schema))
        if missing or extra:
            raise TypeError(
                f"registering {self.kind} {name!r}: metadata must be {sorted(self._meta_schema)}, "
                f"got {sorted(meta)}"
            )
        for key, allowed in self._meta_schema.items():
            if allowed is not None and meta[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {meta[key]!r}")

        def decorate(builder: B) -> B:
            known = self._builders.get(name)
            if known is not None and known is not builder:
                by = getattr(known, "__qualname__", repr(known))
                raise ValueError(f"{self.kind} {name!r} is already registered (by {by})")
            self._builders[name] = builder
            self._meta[name] = MappingProxyType(dict(meta))
            return builder

        return decorate(builder) if builder is not None else decorate

    # -- lookup ----------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        """The builder of ``name``; :class:`UnknownNameError` (a ``ValueError``) otherwise."""
        try:
            return self._builders[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"{self.kind} must be one of {sorted(self._builders)}, got unknown {self.kind} {name!r}"
            ) from None

    def meta(self, name: str) -> Mapping[str, Any]:
        """The metadata given at registration (read-only)."""
        self.get(name)
        return self._meta[name]

    def options(self, name: str) -> Options:
        """The keyword options of ``name``'s builder (its positional arguments left out)."""
        return signature_options(self.get(name), skip=self.positional)

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """Raise ``ValueError`` naming the registry entry, the unknown option(s) and the
        accepted ones when ``name``'s builder does not take every key of ``options``."""
        accepted = self.options(name)
        unknown = accepted.unknown(options)
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} got unknown option(s) {unknown}; accepted options: {sorted(accepted.names)}"
            )

    def build(self, name: str, /, *args: Any, **options: Any) -> Any:
        """``builder(*args, **options)`` after checking the name and the option names (``name``
        is positional-only, so a builder may itself take a ``name`` option)."""
        builder = self.get(name)
        self.check_options(name, options)
        return builder(*args, **options)

    # -- read-only dict view ---------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        try:
            return name in self._builders
        except TypeError:  # unhashable: not a name
            return False

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def keys(self):
        return self._builders.keys()

    def items(self):
        return self._builders.items()

    def values(self):
        return self._builders.values()
