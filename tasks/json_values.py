"""Results as JSON-able dicts: a dataclass's fields, with paths as strings."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def _paths_as_text(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in items}


def json_fields(result: DataclassInstance) -> dict[str, Any]:
    """``dataclasses.asdict(result)`` (nested dataclasses too) with every field that holds a
    :class:`~pathlib.Path` as its string: what a result's ``to_dict`` writes to JSON."""
    return asdict(result, dict_factory=_paths_as_text)
