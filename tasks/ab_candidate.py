"""The registry's candidate pointer: set, clear and promote a challenger under test.

``models_dir/candidate`` (format: :func:`capture.pointers.read_candidate`) names the version
under test beside ``current``; every change here holds the ONE registry lock
(:func:`tasks.registry_lock.registry_lock`, re-entrant) and is recorded in ``history.jsonl``
(actions ``candidate-set``, ``candidate-share``, ``candidate-clear``, ``candidate-rollback``,
``candidate-promote``). A ``candidate-set`` starts a test (its evidence counts from then); setting
the same candidate again changes nothing, and a canary's new share (``candidate-share``) keeps
its test and start. Every change refuses a models_dir that does not exist
(:class:`tasks.registry.NoRegistryError`): nothing here creates a registry.
Running services pick the change up within their reload interval (:class:`capture.ab_routing.
CandidateServing`); clearing is one unlink, so a service sees the candidate or none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from capture.model_dir import ModelDirError
from capture.pointers import (
    CANDIDATE_MODES,
    CandidatePointer,
    check_candidate,
    read_candidate,
    write_candidate,
)
from capture.pointers import clear_candidate as _unlink_candidate
from tasks.registry import (
    DEFAULT_LOCK_TIMEOUT_S,
    RegistryError,
    _append_history,
    _now,
    current_version,
    deploy,
    registry_lock,
    require_registry_dir,
    servable_version_dir,
)

logger = logging.getLogger(__name__)

DEFAULT_CANARY_SHARE = 0.1


def candidate(models_dir: Path) -> CandidatePointer | None:
    """The candidate under test, or None. Raises ``ModelDirError`` when the file is malformed."""
    return read_candidate(models_dir)


def set_candidate(
    models_dir: Path,
    version: str,
    *,
    mode: str = "shadow",
    share: float | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    reason: str | None = None,
) -> CandidatePointer:
    """Put ``version`` under test in ``mode`` (``shadow`` or ``canary``); ``share`` is the canary's
    share of users, > 0 and <= 1 (default :data:`DEFAULT_CANARY_SHARE`; shadow takes none and
    stores 0). Returns the pointer as it is.

    The same version, mode and share again changes nothing (no history line: the test and its
    start stay). A new share for the canary under test is recorded as ``candidate-share`` and
    keeps the test's start; any other change (another version, shadow -> canary) is a
    ``candidate-set``: a new test whose evidence counts from now.

    Raises ``RegistryError`` for a bad mode or share (naming ``--mode``/``--share``), when the
    version is not in the registry, cannot serve (missing ONNX files), or is the serving
    champion; ``NoRegistryError`` when ``models_dir`` does not exist; ``RegistryBusyError``
    when another run holds the lock.
    """
    share = check_mode_and_share(mode, share)
    try:
        check_candidate(version, mode, share, models_dir / "candidate")
    except ModelDirError as exc:
        raise RegistryError(str(exc)) from exc
    require_registry_dir(models_dir, "candidate set")
    with registry_lock(models_dir, timeout=lock_timeout):
        servable_version_dir(models_dir, version)
        champion = current_version(models_dir)
        if champion == version:
            raise RegistryError(
                f"version {version} is the serving champion; a candidate must be another version"
            )
        if champion is None:
            raise RegistryError(
                f"nothing is deployed in {models_dir}: deploy a champion before testing a "
                "candidate beside it"
            )
        before = read_candidate(models_dir)
        same_test = before is not None and (before.version, before.mode) == (version, mode)
        if same_test and before is not None and before.share == share:
            logger.info("candidate %s is already under test (%s): nothing changed", version, mode)
            return before
        write_candidate(models_dir, version, mode, share)
        _append_history(
            models_dir,
            {
                "at": _now(),
                "action": "candidate-share" if same_test else "candidate-set",
                "version": version,
                "mode": mode,
                "share": share,
                "champion": champion,
                "previous": None if before is None else before.version,
                "reason": reason,
            },
        )
        logger.info(
            "candidate %s under test (%s, share %.3f) beside %s", version, mode, share, champion
        )
        pointer = read_candidate(models_dir)
        assert pointer is not None
        return pointer


def check_mode_and_share(mode: str, share: float | None) -> float:
    """The share to store for ``mode`` (``--share`` given or None): a canary's is > 0 and <= 1
    (default :data:`DEFAULT_CANARY_SHARE`); shadow takes none (0). Raises ``RegistryError``
    naming ``--mode`` or ``--share``."""
    if mode not in CANDIDATE_MODES:
        raise RegistryError(f"--mode: expected one of {', '.join(CANDIDATE_MODES)}, found {mode!r}")
    if mode != "canary":
        if share is not None:
            raise RegistryError(
                f"--share: applies to --mode canary only (a shadow candidate answers nobody), "
                f"found --share {share:g} with --mode {mode}; drop --share or use --mode canary"
            )
        return 0.0
    if share is None:
        return DEFAULT_CANARY_SHARE
    number = isinstance(share, int | float) and not isinstance(share, bool)
    if not number or not 0.0 < share <= 1.0:
        raise RegistryError(
            "--share: expected the canary's share of users, a number > 0 and <= 1 (0.1 = 10%), "
            f"found {f'{share:g}' if number else repr(share)}"
        )
    return float(share)


def clear_candidate(
    models_dir: Path,
    *,
    action: str = "candidate-clear",
    reason: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> CandidatePointer | None:
    """Stop testing the candidate (the champion takes all traffic); returns what was cleared
    (None: there was no candidate). ``action`` names it in the history (``candidate-rollback``
    for a rollback decided by the A/B check). Raises ``NoRegistryError`` when ``models_dir``
    does not exist."""
    require_registry_dir(models_dir, "candidate clear")
    with registry_lock(models_dir, timeout=lock_timeout):
        try:
            before = read_candidate(models_dir)
        except ModelDirError:
            before = None  # a malformed pointer is cleared too
        removed = _unlink_candidate(models_dir)
        if removed:
            _append_history(
                models_dir,
                {
                    "at": _now(),
                    "action": action,
                    "version": None if before is None else before.version,
                    "mode": None if before is None else before.mode,
                    "champion": current_version(models_dir),
                    "reason": reason,
                },
            )
            logger.info("candidate cleared (%s): %s", action, reason or "no reason given")
        return before


def promote_candidate(
    models_dir: Path,
    *,
    reason: str | None = None,
    expected: str | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Deploy the candidate as the champion and clear the pointer, under one lock hold.

    ``expected``: refuse unless the candidate is still this version (the A/B check decided on
    it). Returns ``{"promoted", "previous"}``. Raises ``RegistryError`` when there is no
    candidate (or another one than ``expected``).
    """
    with registry_lock(models_dir, timeout=lock_timeout):
        pointer = read_candidate(models_dir)
        if pointer is None or (expected is not None and pointer.version != expected):
            raise RegistryError(
                f"no candidate {expected or ''} under test in {models_dir} (found "
                f"{None if pointer is None else pointer.version}); nothing to promote"
            )
        previous = deploy(models_dir, pointer.version, lock_timeout=lock_timeout)
        clear_candidate(models_dir, action="candidate-promote", reason=reason)
        return {"promoted": pointer.version, "previous": previous}


def apply_decision(
    models_dir: Path,
    *,
    decided_on: str,
    decision: str,
    reason: str,
    canary_share: float = DEFAULT_CANARY_SHARE,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Carry out an A/B decision for candidate ``decided_on``, under the registry lock.

    ``promote``: deploy it and clear the pointer; ``rollback``/``expired``/``reject``: clear the
    pointer (the champion keeps all traffic); ``go-canary``: the shadow candidate becomes a
    canary with ``canary_share``; ``keep-testing``/``none``: nothing. When the pointer names
    another version than ``decided_on`` (changed since the evidence was read), nothing is done.
    Returns ``{"action", "version", "applied", ...}``.
    """
    with registry_lock(models_dir, timeout=lock_timeout):
        pointer = read_candidate(models_dir)
        out: dict[str, Any] = {"action": decision, "version": decided_on, "applied": False}
        if pointer is None or pointer.version != decided_on:
            out["note"] = (
                f"candidate is now {None if pointer is None else pointer.version}, not "
                f"{decided_on}: nothing changed"
            )
            return out
        if decision == "promote":
            out.update(promote_candidate(models_dir, reason=reason, expected=decided_on))
        elif decision in {"rollback", "expired", "reject"}:
            clear_candidate(models_dir, action=f"candidate-{decision}", reason=reason)
        elif decision == "go-canary":
            set_candidate(models_dir, decided_on, mode="canary", share=canary_share, reason=reason)
        else:
            return out
        out["applied"] = True
        return out
