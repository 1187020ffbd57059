"""The orphan sweep's choices: which pools it deletes, and that one failure does not stop it."""

from __future__ import annotations

from types import SimpleNamespace

from gpu_provisioner.cloud.agentpools import PoolState
from gpu_provisioner.cloud.errors import PoolBusyError
from gpu_provisioner.cloud.inventory import PoolInventory
from gpu_provisioner.lifecycle.base import utc_now
from gpu_provisioner.lifecycle.orphans import OrphanSweep

OLD = "2026-01-01T00:00:00Z"


def ours(name: str, state: str = "Succeeded", created: str = OLD) -> PoolState:
    tags = {"kaito-gpu-provisioner": "managed", "kaito-claim": f"nodeclaims/{name}", "kaito-created-at": created}
    return PoolState(name, state, "Standard_NC6s_v3", tags)


class Pools:
    def __init__(self, states: list[PoolState], refusing: set[str]) -> None:
        self.states, self.refusing, self.deleted = states, refusing, []

    def list(self) -> list[PoolState]:
        return self.states

    def delete(self, name: str) -> None:
        if name in self.refusing:
            raise PoolBusyError("another operation is in progress", "OperationNotAllowed", 409)
        self.deleted.append(name)


def sweep(states: list[PoolState], refusing: set[str] = frozenset(), live_claims: set[str] = frozenset()):
    pools = Pools(states, set(refusing))
    inventory = PoolInventory(pools, 10.0, lambda before, after: None)
    inventory.refresh()
    deps = SimpleNamespace(inventory=inventory, settings=SimpleNamespace(orphan_grace_s=600), clock=utc_now)
    deleted = OrphanSweep(deps, lambda key: key.split("/", 1)[1] in live_claims).sweep()
    return deleted, pools.deleted, {name: inventory.get(name).provisioning_state for name in pools.deleted}


def test_old_orphans_are_deleted_and_everything_else_is_left_alone():
    states = [ours("orphan"), ours("young", created="2999-01-01T00:00:00Z"), ours("creating", "Creating"),
              ours("going", "Deleting"), ours("claimed"), PoolState("foreign", "Succeeded", "Standard_NC6s_v3", {})]
    deleted, sent, recorded = sweep(states, live_claims={"claimed"})
    assert deleted == sent == ["orphan"] and recorded == {"orphan": "Deleting"}


def test_a_pool_that_refuses_its_delete_does_not_stop_the_sweep():
    deleted, sent, _ = sweep([ours("stuck"), ours("next")], refusing={"stuck"})
    assert deleted == sent == ["next"]


def made_by_go(name: str, created: str = "2026-01-01T00-00-00Z") -> PoolState:
    """A pool the Go gpu-provisioner v0.3+ made for a NodeClaim (untagged; its node labels tell it)."""
    node_labels = {"kaito.sh/workspace": "ws", "kaito.sh/workspacenamespace": "default",
                   "karpenter.sh/nodepool": "kaito", "kaito.sh/machine-type": "gpu",
                   "kaito.sh/creation-timestamp": created}
    return PoolState(name, "Succeeded", "Standard_NC6s_v3", node_labels=node_labels)


def test_old_pools_the_go_provisioner_made_for_nodeclaims_that_are_gone_are_deleted_as_its_own_sweep_did():
    machine_era = made_by_go("machine")  # v0.2 (Machines): no creation time, no node pool label, no sweep of its own
    del machine_era.node_labels["kaito.sh/creation-timestamp"], machine_era.node_labels["karpenter.sh/nodepool"]
    not_kaitos = made_by_go("nokaito")
    del not_kaitos.node_labels["kaito.sh/workspace"]
    states = [made_by_go("orphan"), made_by_go("young", created="2999-01-01T00-00-00Z"), made_by_go("claimed"),
              made_by_go("badtime", created="yesterday"), machine_era, not_kaitos]
    deleted, sent, _ = sweep(states, live_claims={"claimed"})
    assert deleted == sent == ["orphan"]
