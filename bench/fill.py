"""Fill a data directory's queue with N events pending for one destination, through the
journal itself (the same schema, dedupe index and commits as the daemon's ingest).

python bench/fill.py DATA_DIR N DESTINATION
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from router.events import StoredEvent, new_message_id
from router.journal import open_journal

EVENT = {
    "type": "track",
    "userId": "user-1234567890",
    "event": "Order Completed",
    "properties": {"orderId": "order-123456", "revenue": 99.95, "currency": "USD"},
}


async def main(data_dir: Path, count: int, destination: str) -> None:
    async with open_journal(data_dir / "queue.db") as journal:
        await journal.ensure_cursors([destination])
        for start in range(0, count, 5000):
            events = []
            for _ in range(min(5000, count - start)):
                message_id = new_message_id()
                body = json.dumps({**EVENT, "messageId": message_id}).encode()
                events.append(StoredEvent(message_id, body))
            await journal.append("bench", events, time.time())


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
