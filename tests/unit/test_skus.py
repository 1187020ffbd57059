"""The built-in VM size table against Kaito's SKU list (tests/data/kaito-azure-skus.csv)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gpu_provisioner.cloud.skus import CATALOGUE, lookup

KAITO_SKUS = Path(__file__).resolve().parents[1] / "data" / "kaito-azure-skus.csv"


def kaito_skus() -> dict[str, dict[str, str]]:
    with KAITO_SKUS.open() as data:
        rows = csv.DictReader(line for line in data if not line.startswith("#"))
        return {row["sku"]: row for row in rows}


def test_every_size_in_kaitos_list_is_in_the_table_with_its_gpus():
    kaito = kaito_skus()
    assert len(kaito) >= 29  # every release from v0.3.1 to v0.12.0
    missing = sorted(set(kaito) - set(CATALOGUE))
    assert missing == [], f"sizes in Kaito's SKU list the built-in table lacks: {missing}"
    wrong = {name: (CATALOGUE[name].gpu_count, CATALOGUE[name].gpu_memory_gib, row["gpu_count"], row["gpu_memory_gib"])
             for name, row in kaito.items()
             if (CATALOGUE[name].gpu_count, CATALOGUE[name].gpu_memory_gib)
             != (int(row["gpu_count"]), int(row["gpu_memory_gib"]))}
    assert wrong == {}, "table (count, GiB) differs from Kaito's (count, GiB)"
    # A GPU size in the table that Kaito never listed would be a guess: say so when one appears.
    assert sorted(n for n, s in CATALOGUE.items() if s.is_gpu and n not in kaito) == []


@pytest.mark.parametrize(("name", "vcpus"), [
    ("Standard_D4s_v5", 4), ("Standard_D8s_v5", 8), ("Standard_D4_v5", 4), ("Standard_D16s_v4", 16),
    ("Standard_D4ads_v5", 4), ("standard_d4s_v5", 4),
])
def test_todays_common_cpu_sizes_are_known(name, vcpus):
    size = lookup(name)
    assert size is not None and not size.is_gpu and size.vcpus == vcpus and size.memory_gib == 4 * vcpus
    assert size.family.lower().startswith("standardd")
