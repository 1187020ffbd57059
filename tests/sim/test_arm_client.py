"""The controller's ARM client (cloud/agentpools.py) against the simulator, through the real SDK pipeline."""

from __future__ import annotations

from azure.core.pipeline.policies import ContentDecodePolicy

from gpu_provisioner.cloud.agentpools import AgentPools
from gpu_provisioner.settings import Settings
from tests.sim.test_simulator import GPU_POOL, create, sdk


def test_a_pool_list_parses_arms_json_once(start_sim, monkeypatch):
    """The LIST is read whole by the client; the pipeline's ContentDecodePolicy must not parse it as well (a LIST of
    1,000 pools is 2 MB of JSON, and the pool inventory LISTs every few seconds while pools are followed)."""
    sim = start_sim(materialise_nodes=False, create_delay_s=0.1)
    for name in ("gpua", "gpub"):
        create(sdk(sim, monkeypatch), sim, name, GPU_POOL).result()
    parsed_by_the_pipeline: list[str] = []
    decode = ContentDecodePolicy.deserialize_from_http_generics  # bound to the class

    def recorded(cls, response, encoding=None):
        parsed_by_the_pipeline.append(response.request.url)
        return decode(response, encoding)

    monkeypatch.setattr(ContentDecodePolicy, "deserialize_from_http_generics", classmethod(recorded))
    pools = AgentPools(Settings.load()).list()
    assert sorted(pool.name for pool in pools) == ["gpua", "gpub"]
    assert all(pool.provisioning_state == "Succeeded" for pool in pools)
    assert [url for url in parsed_by_the_pipeline if "/agentPools" in url] == []
    # The hook sees what the pipeline parses: an SDK operation's answer is.
    sdk(sim, monkeypatch).agent_pools.get(sim.resource_group, sim.cluster_name, "gpua")
    assert [url for url in parsed_by_the_pipeline if "/agentPools/gpua" in url]
