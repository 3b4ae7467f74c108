"""What every flow does at its entry: resolve its run's settings, gather the parameters its
subflows get, and build its rule objects from its parameters.

Every flow takes ``home``, ``database_url`` (never one with a password) and ``database_secret``
(a Prefect Secret block name): :func:`open_run` resolves them once
(``tasks.run_settings.resolve_run_settings``), and a flow hands its subflows the same
parameters as a :class:`Where`, never the resolved URL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from capture.settings import get_settings
from tasks.run_settings import RunSettings, resolve_run_settings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    D = TypeVar("D", bound=DataclassInstance)


class Where(TypedDict, total=False):
    """A flow's home and database parameters, as a subflow is given them (``**where``)."""

    home: str | None
    database_url: str | None
    database_secret: str | None


def open_run(
    home: str | None = None, database_url: str | None = None, database_secret: str | None = None
) -> RunSettings:
    """The run's settings from the process settings (``capture.settings.get_settings``, read
    here and nowhere below) and the flow's ``home`` and database parameters."""
    return resolve_run_settings(
        get_settings(), home=home, database_url=database_url, database_secret=database_secret
    )


def from_parameters(cls: type[D], parameters: Mapping[str, Any]) -> D:
    """The dataclass ``cls`` (a selection, thresholds, gate rules, …) from the parameters of
    the same names of a flow (or of a command): ``parameters`` is its ``locals()``, taken
    before any other local variable is named like a field. A field no parameter names keeps
    its default; the dataclass checks the values (its ``UserError`` names the parameter)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in parameters.items() if name in names})
