"""Claim -> agent pool request: pure mapping and local validation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from gpu_provisioner.api.claims import MACHINE, NODECLAIM, Claim
from gpu_provisioner.cloud.pool_request import (
    MANAGED_TAG,
    InvalidClaim,
    build_pool_request,
    is_reserved_label,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CREATED = "2026-11-24T10:00:00Z"


def claim(api, mutate=None, uid="uid-1") -> Claim:
    manifest = yaml.safe_load((EXAMPLES / f"kaito-{api.name}.yaml").read_text())
    manifest["metadata"]["uid"] = uid
    if mutate:
        mutate(manifest)
    return Claim(api, copy.deepcopy(manifest))


def test_machine_maps_to_the_go_provisioners_body():
    request = build_pool_request(claim(MACHINE), CREATED)
    body = request.body(request.vm_sizes[0])["properties"]
    assert body["vmSize"] == "Standard_NC6s_v3" and body["count"] == 1
    assert body["osDiskSizeGB"] == 50 and body["osSKU"] == "Ubuntu" and body["osType"] == "Linux"
    assert body["nodeTaints"] == ["sku=gpu:NoSchedule"]
    assert body["nodeLabels"]["karpenter.sh/provisioner-name"] == "default"
    assert body["nodeLabels"]["kaito.sh/machine-type"] == "gpu"
    assert body["nodeLabels"]["kaito.sh/creation-timestamp"] == "2026-11-24T10-00-00Z"
    assert body["tags"][MANAGED_TAG] == "managed" and body["tags"]["kaito-claim"] == "machines/ws1a2b3c4d5"


def test_nodeclaim_uses_nodepool_label_and_image_family():
    request = build_pool_request(
        claim(NODECLAIM, lambda m: m["metadata"]["annotations"].update({"kaito.sh/node-image-family": "AzureLinux"})),
        CREATED,
    )
    body = request.body(request.vm_sizes[0])["properties"]
    assert body["nodeLabels"]["karpenter.sh/nodepool"] == "kaito"
    assert body["osSKU"] == "AzureLinux" and body["osDiskSizeGB"] == 87


def test_sizes_keep_the_claims_order_and_skip_unknown_ones():
    def sizes(m):
        m["spec"]["requirements"][0]["values"] = ["Standard_Unknown_v1", "Standard_NC24ads_A100_v4", "standard_nc6s_v3"]

    request = build_pool_request(claim(MACHINE, sizes), CREATED)
    assert [s.name for s in request.vm_sizes] == ["Standard_NC24ads_A100_v4", "Standard_NC6s_v3"]


def with_storage(storage) -> Claim:
    return claim(MACHINE, lambda m: m["spec"]["resources"]["requests"].update(storage=storage))


@pytest.mark.parametrize(("storage", "expected"), [
    ("20Gi", 30), ("34Gi", 34), ("2Ti", 2048), ("1.5Gi", 30), ("64424509440", 60), (5, 30), ("+34Gi", 34),
])
def test_os_disk_follows_the_storage_request_within_aks_limits(storage, expected):
    request = build_pool_request(with_storage(storage), CREATED)
    assert request.os_disk_gb == expected
    assert request.body(request.vm_sizes[0])["properties"]["osDiskSizeGB"] == expected


@pytest.mark.parametrize("storage", ["0", 0, "0Gi", "0.0", "-0"])
def test_a_zero_storage_request_sends_no_disk_size_so_aks_uses_its_default(storage):
    request = build_pool_request(with_storage(storage), CREATED)
    assert request.os_disk_gb is None
    assert "osDiskSizeGB" not in request.body(request.vm_sizes[0])["properties"]


def test_a_claim_without_a_storage_request_gets_aks_default_disk():
    request = build_pool_request(claim(MACHINE, lambda m: m["spec"]["resources"]["requests"].pop("storage")), CREATED)
    assert "osDiskSizeGB" not in request.body(request.vm_sizes[0])["properties"]


NOT_A_QUANTITY = "not a Kubernetes quantity"


@pytest.mark.parametrize(("storage", "says"), [
    ("-5Gi", "negative"), ("-1", "negative"), (-30, "negative"),
    # Fractional bytes: a size whose unit was left out, never meant as a fraction of a byte.
    ("0.5", "whole number of bytes"), ("1.5", "whole number of bytes"), (0.5, "whole number of bytes"),
    ("100m", "whole number of bytes"), ("1e-3", "whole number of bytes"),
    # Not Kubernetes quantities, though Python's parse_quantity takes some of them.
    ("plenty", NOT_A_QUANTITY), ("", NOT_A_QUANTITY), ("NaN", NOT_A_QUANTITY), ("Infinity", NOT_A_QUANTITY),
    ("1_000Gi", NOT_A_QUANTITY), ("1e3Gi", NOT_A_QUANTITY), ("1e1.5", NOT_A_QUANTITY), ("5 Gi", NOT_A_QUANTITY),
    ("34gi", NOT_A_QUANTITY), (True, NOT_A_QUANTITY),
    ("3Ti", "exceeds"), ("2048.5Gi", "exceeds"),
    ("1e999999999", "exceeds"),  # refused before it is made an integer of a billion digits
])
def test_storage_requests_that_cannot_be_meant_are_refused(storage, says):
    with pytest.raises(InvalidClaim) as refused:
        build_pool_request(with_storage(storage), CREATED)
    assert refused.value.reason == "InvalidStorageRequest"
    assert says in refused.value.message and str(storage) in refused.value.message


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m["metadata"].update(name="workspace-long-name"), "InvalidPoolName"),
        (lambda m: m["metadata"].update(name="1abc"), "InvalidPoolName"),
        (lambda m: m["spec"]["requirements"].pop(0), "InstanceTypeMissing"),
        (lambda m: m["spec"]["requirements"][0].update(values=["Standard_Nope"]), "UnknownInstanceType"),
        (lambda m: m["spec"]["resources"]["requests"].update(storage="3Ti"), "InvalidStorageRequest"),
        (lambda m: m["spec"]["taints"][0].update(value="a=b:c"), "InvalidTaint"),
        (lambda m: m["metadata"].update(annotations={"kaito.sh/node-image-family": "windows"}),
         "UnsupportedNodeImageFamily"),
    ],
)
def test_bad_claims_are_refused_with_a_reason(mutate, reason):
    with pytest.raises(InvalidClaim) as refused:
        build_pool_request(claim(MACHINE, mutate), CREATED)
    assert refused.value.reason == reason
    assert refused.value.message


@pytest.mark.parametrize("label", [
    "kubernetes.azure.com/mode", "kubernetes.io/hostname", "node-role.kubernetes.io/control-plane",
    "kubelet.kubernetes.io/anything", "storage.k8s.io/class",
])
def test_labels_that_would_disguise_the_node_refuse_the_claim(label):
    with pytest.raises(InvalidClaim) as refused:
        build_pool_request(claim(MACHINE, lambda m: m["metadata"]["labels"].update({label: "system"})), CREATED)
    assert refused.value.reason == "RestrictedLabel"
    assert label in refused.value.message


def test_labels_that_describe_the_node_are_allowed_but_left_to_aks():
    describing = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "topology.kubernetes.io/zone": "eastus-1",
                  "node.kubernetes.io/instance-type": "Standard_NC6s_v3"}

    def labelled(m):
        m["metadata"]["labels"].update({**describing, "node-restriction.kubernetes.io/team": "a"})

    labels = build_pool_request(claim(MACHINE, labelled), CREATED).node_labels
    assert not set(describing) & set(labels)
    assert labels["node-restriction.kubernetes.io/team"] == "a"
    assert not is_reserved_label("kaito.sh/workspace") and is_reserved_label("topology.kubernetes.io/zone")
