"""Child process for tests/test_durability.py (``python -m tests.capture_child URL HOME N OUT``).

Logs N prompts in ``spool`` durability mode: the first half is flushed to the database, the
second half stays queued (huge batch size and flush interval). It then writes the ids to OUT and
waits to be killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from capture.service import create_nlu_service
from capture.settings import Settings
from tests.capture_helpers import FixedClassifier


async def main(url: str, home: Path, count: int, out: Path) -> None:
    settings = Settings(
        home=home,
        database_url=url,
        durability="spool",
        batch_size=1_000_000,
        flush_interval_s=3600,
    )
    service = create_nlu_service(FixedClassifier(), url=url, settings=settings)
    ids = []
    for i in range(count):
        result = await service.process_message(f"child prompt {i}", message_index=i)
        if i % 2 == 0:
            await service.update_workflow_outcome(result.log_id, True, f"child-{i}")
        ids.append(str(result.log_id))
        if i == count // 2 - 1:
            await service.flush()
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(ids))
    os.replace(tmp, out)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
