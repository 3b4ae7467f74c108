"""The project's log lines in the run's logs: what ``tasks.*`` and ``capture.*`` modules log
(training progress, ONNX parity, the registry switch, the review export...) inside a flow or
task run is sent to the Prefect API with that run, so an operator reads it in the UI next to the
run's own lines, whoever started the run (a worker, ``prompt-capture serve``, the CLI, a test).

Prefect only forwards its own loggers (``prefect.flow_runs``, ``prefect.task_runs``) and
``PREFECT_LOGGING_EXTRA_LOGGERS``, a setting every launcher would have to carry (and whose
handler warns about every line logged outside a run). :func:`send_logs_to_run` attaches one
:class:`RunLogHandler` to the ``tasks`` and ``capture`` loggers instead; every flow calls it at
its entry (``tasks.run_settings.resolve_run_settings``). Lines logged outside a run (the
``train`` command, the NLU service) are left to the process's own handlers.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

logger = logging.getLogger(__name__)

#: The loggers (with their children) whose records go to the run's logs.
RUN_LOGGERS = ("tasks", "capture")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for records logged inside a flow or task run; records logged
    outside any run are skipped silently (Prefect's own handler warns about each)."""

    def emit(self, record: logging.LogRecord) -> None:
        if (
            getattr(record, "flow_run_id", None) is None
            and FlowRunContext.get() is None
            and TaskRunContext.get() is None
        ):
            return
        super().emit(record)


def send_logs_to_run(names: tuple[str, ...] = RUN_LOGGERS) -> None:
    """Attach a :class:`RunLogHandler` to each logger of ``names`` that has no Prefect API
    handler yet (idempotent; ``PREFECT_LOGGING_EXTRA_LOGGERS`` may have attached Prefect's), and
    let INFO records through where the process logs only warnings (Prefect's default root level
    in a worker's flow-run process). A level set lower (``--verbose``: DEBUG) is kept."""
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in target.handlers):
            target.addHandler(RunLogHandler())
        if target.getEffectiveLevel() > logging.INFO:
            target.setLevel(logging.INFO)
