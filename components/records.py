"""Results that cross a process boundary (Airflow XCom, Kubeflow outputs, `--json`): dataclasses that become plain
JSON-able dicts with ``to_dict`` and are rebuilt, nested records included, with ``from_dict``."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Self, cast


class Record:
    """Base of a dataclass whose fields hold JSON values or other records."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(cast(Any, self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The record ``to_dict`` made; a field it does not have, or a missing one, is refused in one line."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}: expected a mapping of its fields, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cast(Any, cls))
        names = [f.name for f in fields]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__}: unexpected field(s) {', '.join(unknown)}; expected only {names}")
        missing = [f.name for f in fields if f.name not in data and _required(f)]
        if missing:
            raise TypeError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
        return cls(**{key: _revive(hints[key], value) for key, value in data.items()})


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _revive(hint: Any, value: Any) -> Any:
    """``value`` as the record type its field is annotated with (``R`` or ``R | None``), else unchanged."""
    if value is None or not isinstance(value, Mapping):
        return value
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    for option in typing.get_args(hint) if union else (hint,):
        if isinstance(option, type) and issubclass(option, Record):
            return option.from_dict(value)
    return value
