"""One small generic registry, shared by models, pooling, backbones and normalisers.

timm/torchvision style: a decorator registers a builder under a name, and one front
door (``create``) builds by name, with an error that lists what exists.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders. ``kind`` names what is registered, for error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REG.register("max")`` or ``@REG.register()`` (uses ``__name__``)."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._builders[key] = builder
            return builder

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._builders[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._builders))}"
            ) from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self):
        return iter(self.names())
