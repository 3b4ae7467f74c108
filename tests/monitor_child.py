"""Child process for tests/test_monitor_hours.py: ``python -m tests.monitor_child RUN_DIR NAME
DB_URL HOME NOW WEBHOOK_URL``.

Imports everything, waits at the test's barrier (``tests.barrier.wait_for_go``: both children
start together), then runs the monitor once at NOW (the hour loop and the delivery, as the
flow's two tasks do) and writes what it did to ``RUN_DIR/<NAME>.json``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    run_dir, (name, url, home, now, webhook) = Path(argv[0]), argv[1:6]
    from capture.files import write_json_atomic
    from tasks.alert_delivery import deliver_alerts
    from tasks.monitor import AlertThresholds
    from tasks.monitor_hours import check_hours
    from tests.barrier import wait_for_go

    wait_for_go(run_dir, name)
    check = check_hours(
        url,
        Path(home),
        now=datetime.fromisoformat(now),
        thresholds=AlertThresholds(),
        channels=["webhook"],
        run_id=name,
    )
    notified = deliver_alerts(url, check, webhook_url=webhook, backoff_s=0.01)
    result = {
        "hours": [h.hour.isoformat() for h in check.hours],
        "pending": len(check.pending),
        "suppressed": [b.key for b in check.suppressed],
        "errors": notified.errors,
    }
    write_json_atomic(run_dir / f"{name}.json", result)


if __name__ == "__main__":
    main(sys.argv[1:])
