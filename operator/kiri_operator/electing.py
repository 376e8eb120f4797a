"""The leader-election loop of a replicated operator: try for the Lease every retry period, and start or
stop reconciling as leadership comes and goes (the election itself is `kube.leasing.Elector`).

Every replica watches and fills its caches, so a standby that takes over reconciles at once from a warm
cache. On becoming the leader it queues every ModelDeployment: the reconcile is level-based, so it picks
up each rollout where the status and the children say it is, whatever the old leader was doing. On
losing the Lease it stops: the queue's workers skip their keys, and any write still in flight is refused
by the client's fence (`Kube.fence`), which runs out before another replica may take the Lease.
"""

from __future__ import annotations

import asyncio
import logging

from kiri_operator import metrics
from kiri_operator.memos import Runtime

log = logging.getLogger(__name__)


async def campaign(runtime: Runtime) -> None:
    elector = runtime.elector
    assert elector is not None
    loop = asyncio.get_running_loop()
    was = False
    metrics.LEADER.set(0)
    while True:
        try:
            await loop.run_in_executor(None, elector.step)
        except Exception:  # never let one bad answer end the election: leadership times out on its own
            log.exception("leader election step failed")
        # Sleep in short slices: leadership can run out between tries (renews failing).
        deadline = loop.time() + elector.timing.retry_period
        while True:
            now = elector.leading()
            if now != was:
                was = now
                _moved(runtime, now)
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(left, 0.25))


def _moved(runtime: Runtime, leading: bool) -> None:
    assert runtime.elector is not None
    metrics.LEADER.set(1 if leading else 0)
    metrics.LEADER_TRANSITIONS.labels("leader" if leading else "standby").inc()
    if leading:
        log.info("leader: reconciling (%d ModelDeployment(s) queued)", len(runtime.cache.mds))
        for key in runtime.cache.md_keys():
            runtime.enqueue(key, watched=False)
    else:
        log.warning("lost the leader Lease (holder now %r): reconciles stop", runtime.elector.holder)


async def release(runtime: Runtime) -> None:
    if runtime.elector is not None:
        await asyncio.get_running_loop().run_in_executor(None, runtime.elector.release)
        metrics.LEADER.set(0)
