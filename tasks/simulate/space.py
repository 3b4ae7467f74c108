"""One simulator run's space: its own home and database, and how each week runs.

Every run (one strategy with one seed, and the first model of each seed) gets a fresh home under
``output/runs/<name>/home`` and a migrated database: an SQLite file in that home, or, when the
simulation names a PostgreSQL server, a new database on it (dropped when the run ends; the files
stay for inspection). The production flows get the run's home and database as parameters; a
database URL with a password travels as the name of a Prefect Secret block created for the run.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture import db
from capture.settings import Settings
from tasks.corrections import ImportResult
from tasks.layout import HomeLayout
from tasks.records import write_records
from tasks.run_settings import has_password, redacted
from tasks.simulate.data import SimulationError, TrafficPlan

logger = logging.getLogger(__name__)

SECRET_PREFIX = "prompt-capture-sim"


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """How each simulated week runs (everything but the strategy and the seed).

    ``review_confidence_threshold`` 1.0 and ``review_margin_threshold`` above 1 make every prompt
    of the week a review candidate, so the strategy alone decides what the budget is spent on
    (production's defaults are 0.7 and 0.15: only uncertain or failed prompts are candidates).
    ``hyperparameters`` are ``TrainConfig`` overrides for every training (first model and
    retrains); ``max_pairs``, ``holdout_fraction``, ``min_confidence``, ``quantize`` and the gate
    rules are the weekly cycle's parameters.
    """

    weeks: int = 4
    review_budget: int = 300
    initial_per_intent: int = 5
    traffic_per_week: int = 3000
    gate_per_intent: int = 3
    review_days: int = 7
    review_confidence_threshold: float = 1.0
    review_margin_threshold: float = 1.01
    fail_if_wrong: float = 0.5
    fail_if_right: float = 0.05
    users: int = 200
    hyperparameters: Mapping[str, Any] | None = None
    max_pairs: int = 2000
    holdout_fraction: float = 0.2
    min_confidence: float = 0.9
    max_overall_drop: float = 0.0
    max_intent_drop: float = 0.05
    min_support: int = 10
    quantize: bool = True

    def __post_init__(self) -> None:
        for name in ("weeks", "traffic_per_week", "initial_per_intent", "gate_per_intent"):
            if getattr(self, name) < 1:
                raise SimulationError(f"{name}: expected at least 1, found {getattr(self, name)}")
        if self.review_budget < 0:
            raise SimulationError(f"review_budget: expected >= 0, found {self.review_budget}")
        for name in ("fail_if_wrong", "fail_if_right", "review_confidence_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimulationError(f"{name}: expected a number in [0, 1], found {value!r}")

    def weekly_cycle_parameters(self) -> dict[str, Any]:
        """Keyword arguments of ``flows.weekly.weekly_cycle`` for this simulation (the run's
        ``home`` and database parameters are added by the caller: :meth:`RunSpace.flow_params`)."""
        return {
            "days": None,
            "min_confidence": self.min_confidence,
            "holdout_fraction": self.holdout_fraction,
            "import_inbox": True,
            "max_pairs": self.max_pairs,
            "warm_start": True,
            "hyperparameters": dict(self.hyperparameters or {}),
            "max_overall_drop": self.max_overall_drop,
            "max_intent_drop": self.max_intent_drop,
            "min_support": self.min_support,
            "deploy": True,
            # The simulator compares review strategies week by week: a promoted challenger
            # serves next week's traffic directly (an A/B test needs real workflow outcomes).
            "deploy_mode": "direct",
            "quantize": self.quantize,
        }


@dataclass(frozen=True, slots=True)
class RunSpace:
    """One run's isolated home and database. ``settings`` are the process settings pointed at
    them (what the NLU service and its capture logger read); ``own_database`` marks a
    PostgreSQL database created for the run; ``secret_block`` names the Prefect Secret block
    holding its URL when that URL carries a password."""

    name: str
    home: Path
    database_url: str
    own_database: bool
    settings: Settings
    server_url: str | None = None
    secret_block: str | None = None

    @property
    def layout(self) -> HomeLayout:
        return HomeLayout(self.home)

    @property
    def models_dir(self) -> Path:
        return self.layout.models_dir

    def flow_params(self) -> dict[str, Any]:
        """``home`` and the database parameters a production flow gets for this run (the URL
        itself only when it carries no password)."""
        if self.secret_block is not None:
            return {"home": str(self.home), "database_secret": self.secret_block}
        return {"home": str(self.home), "database_url": self.database_url}


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower())


def _save_secret(name: str, url: str) -> str:
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    block = f"{SECRET_PREFIX}-{_safe_name(name).replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    Secret(value=SecretStr(url)).save(block, overwrite=True)
    return block


def prepare_space(
    root: Path, name: str, *, settings: Settings, server_url: str | None = None
) -> RunSpace:
    """A fresh home under ``root/name`` and a migrated database: an SQLite file in the home, or,
    when ``server_url`` is a PostgreSQL URL, a new database on that server
    (``capture.db.create_database``)."""
    home = root / name / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    home = home.resolve()
    own = bool(server_url) and db.is_postgres(db.database_url(server_url))
    if own and server_url:
        url = db.create_database(server_url, f"pc_sim_{_safe_name(name)}"[:40])
    else:
        url = HomeLayout(home).sqlite_url
    db.upgrade(url)
    HomeLayout(home).create_registry()  # the flows refuse a home without one (tasks.layout)
    secret = _save_secret(name, url) if has_password(url) else None
    logger.info("run %s: home %s, database %s", name, home, redacted(url))
    return RunSpace(
        name=name,
        home=home,
        database_url=url,
        own_database=own,
        settings=settings.for_run(home, url),
        server_url=server_url if own else None,
        secret_block=secret,
    )


def release_space(space: RunSpace) -> None:
    """Close the run's engines, drop its PostgreSQL database and its Secret block (the files
    stay for inspection)."""
    db.get_sync_engine(space.database_url).dispose()
    asyncio.run(db.get_engine(space.database_url).dispose())
    if space.own_database and space.server_url:
        db.drop_database(space.server_url, space.database_url)
    if space.secret_block is not None:
        from prefect.blocks.system import Secret

        Secret.delete(space.secret_block)


def write_base_files(space: RunSpace, plan: TrafficPlan) -> None:
    """The weekly cycle's base data (``home/data``): the seed set is ``base_train``; the gate
    set is ``base_test`` (what the gate scores) and ``base_val`` (calibration and the ONNX
    parity texts)."""
    layout = space.layout
    write_records(layout.base_file("train"), plan.seed_set)
    write_records(layout.base_file("val"), plan.gate_set)
    write_records(layout.base_file("test"), plan.gate_set)


def clone_registry(source: RunSpace, target: RunSpace) -> None:
    """Give ``target`` the same registry (first model deployed) as ``source``."""
    if target.models_dir.exists():
        shutil.rmtree(target.models_dir)
    shutil.copytree(source.models_dir, target.models_dir)


def check_reviewer_files_applied(space: RunSpace, results: Sequence[ImportResult] | None) -> None:
    """Raise :class:`SimulationError` when the corrections import refused a stand-in
    reviewer's file (a bug in the simulator, never the reviewer's choice)."""
    refused = [r for r in results or () if r.rejected]
    if refused:
        raise SimulationError(
            f"run {space.name}: the corrections import refused the stand-in reviewer's file "
            f"{refused[0].file}: {[str(p) for p in refused[0].rejected[:3]]}"
        )


prepare_space_task = task(name="simulate-prepare-run", cache_policy=NO_CACHE)(prepare_space)
