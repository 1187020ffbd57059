"""Orphan sweep: pools made for a claim that is gone, older than a grace period, are deleted: those tagged as ours,
and those the Go gpu-provisioner made for NodeClaims (its own garbage collection deleted them; replaced, it no longer
does).

No other pool is ever touched, nor a pool of a claim API this controller does not watch.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.cloud.errors import CloudError
from gpu_provisioner.lifecycle.base import Deps

log = structlog.get_logger(__name__)


class OrphanSweep:
    def __init__(self, deps: Deps, claim_exists: Callable[[str], bool | None]) -> None:
        """`claim_exists(key)` answers None when it cannot know (API not watched, cache not synced)."""
        self.deps = deps
        self.claim_exists = claim_exists

    def sweep(self) -> list[str]:
        now = self.deps.clock()
        deleted = []
        for pool in self.deps.inventory.all():
            # A pool still being created refuses a DELETE: it is deleted on a later sweep.
            if (made_for := pool.made_for) is None or pool.operation_running:
                continue
            claim, created_at = made_for
            if self.claim_exists(claim) is not False:
                continue
            if (now - created_at).total_seconds() < self.deps.settings.orphan_grace_s:
                continue
            try:
                self.deps.inventory.delete(pool)
            except CloudError as error:
                # One pool that cannot go now must not keep the others running.
                log.warning("orphaned agent pool not deleted", pool=pool.name, error=error.describe())
                continue
            metrics.ORPHANS_DELETED.inc()
            log.warning("deleting orphaned agent pool", pool=pool.name, claim=claim, vm_size=pool.vm_size,
                        made_by="gpu-provisioner" if pool.managed else "the Go gpu-provisioner")
            deleted.append(pool.name)
        return deleted
