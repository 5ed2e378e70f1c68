"""What v2 promises to keep, and no longer: a job past its `expires_at` (its end + `--job-retention-days`)
leaves the history with its output records, and an asset past its own `expires_at` (an upload's
`expires_in`) goes, with its bytes once no other record holds them. Every API node runs this each minute;
each deletion is idempotent, so nodes of a cluster never get in each other's way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from zimage_serve.queue.jobs import FINISHED

if TYPE_CHECKING:
    from zimage_serve.server.runtime import Runtime

log = logging.getLogger(__name__)
EVERY_S = 60.0
PAGE = 200


def expire(rt: Runtime, now: float) -> tuple[int, int]:
    """One pass: (jobs, assets) removed."""
    cutoff = now - rt.settings.job_retention_s
    jobs = 0
    while True:  # the oldest first; a page with none past its time ends the pass
        page, _ = rt.store.jobs_page(set(FINISHED), None, 0, PAGE, False)
        old = [job.id for job in page if job.finished is not None and job.finished < cutoff]
        if not old:
            break
        jobs += rt.store.delete_history(old)
        rt.records.forget_outputs(old)
        if len(old) < len(page):
            break
    assets = 0
    for asset in rt.records.expired_assets(now, PAGE):
        deleted = rt.records.delete_asset(asset.id)
        if deleted is None:
            continue
        assets += 1
        if deleted[1] and asset.job_id is None:
            path = rt.v2_jobs.file_of(asset.place)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return jobs, assets


async def keep_expiring(rt: Runtime) -> None:
    while True:
        try:
            jobs, assets = await asyncio.to_thread(expire, rt, time.time())
            if jobs or assets:
                log.info("retention: %d job(s) and %d asset(s) past their expiry removed", jobs, assets)
        except Exception:  # a queue that is away (Redis restarting): the next pass tries again
            log.warning("retention pass failed; trying again in %.0f s", EVERY_S, exc_info=True)
        await asyncio.sleep(EVERY_S)
