"""The VM sizes this project knows without asking Azure: every GPU size in Kaito's SKU list (releases
v0.3.1 to v0.12.0, kept in tests/data/kaito-azure-skus.csv and diffed against this table by a test) and
today's common general-purpose CPU sizes.

Figures come from the public Azure VM size documentation (vCPUs, memory, quota family) and from
Kaito's GPU SKU table (GPU count, model, total GPU memory). The controller uses the live catalogue
(cloud/catalogue.py, ARM's Resource SKUs API) when it can and this table when it cannot; GPU model and
memory, which the API does not give, always come from here. The AKS simulator serves this table as its
region's Resource SKUs and uses it to decide what a node reports.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_RESOURCE = "nvidia.com/gpu"
AMD_GPU_RESOURCE = "amd.com/gpu"


@dataclass(frozen=True)
class VmSize:
    name: str
    vcpus: int
    memory_gib: int
    # The regional vCPU quota bucket this size counts against (the "family" of `az vm list-usage`).
    family: str
    gpu_count: int = 0
    gpu_model: str = ""
    gpu_memory_gib: int = 0
    gpu_resource: str = GPU_RESOURCE

    @property
    def is_gpu(self) -> bool:
        return self.gpu_count > 0

    def capacity(self, max_pods: int = 30) -> dict[str, str]:
        """The node capacity a kubelet (plus the GPU device plugin) reports for this size."""
        resources = {
            "cpu": str(self.vcpus),
            "memory": f"{self.memory_gib}Gi",
            "pods": str(max_pods),
            "ephemeral-storage": "128Gi",
        }
        if self.is_gpu:
            resources[self.gpu_resource] = str(self.gpu_count)
        return resources


def _gpu(name: str, vcpus: int, memory_gib: int, family: str, count: int, model: str, gpu_mem: int,
         resource: str = GPU_RESOURCE) -> VmSize:
    return VmSize(f"Standard_{name}", vcpus, memory_gib, family, count, model, gpu_mem, resource)


CATALOGUE: dict[str, VmSize] = {
    size.name: size
    for size in (
        _gpu("NC6s_v3", 6, 112, "standardNCSv3Family", 1, "V100", 16),
        _gpu("NC12s_v3", 12, 224, "standardNCSv3Family", 2, "V100", 32),
        _gpu("NC24s_v3", 24, 448, "standardNCSv3Family", 4, "V100", 64),
        _gpu("NC24rs_v3", 24, 448, "standardNCSv3Family", 4, "V100", 64),
        _gpu("NC4as_T4_v3", 4, 28, "standardNCASv3_T4Family", 1, "T4", 16),
        _gpu("NC8as_T4_v3", 8, 56, "standardNCASv3_T4Family", 1, "T4", 16),
        _gpu("NC16as_T4_v3", 16, 110, "standardNCASv3_T4Family", 1, "T4", 16),
        _gpu("NC64as_T4_v3", 64, 440, "standardNCASv3_T4Family", 4, "T4", 64),
        _gpu("NC24ads_A100_v4", 24, 220, "StandardNCADSA100v4Family", 1, "A100", 80),
        _gpu("NC48ads_A100_v4", 48, 440, "StandardNCADSA100v4Family", 2, "A100", 160),
        _gpu("NC96ads_A100_v4", 96, 880, "StandardNCADSA100v4Family", 4, "A100", 320),
        _gpu("ND96asr_A100_v4", 96, 900, "standardNDASv4_A100Family", 8, "A100", 320),
        _gpu("ND96amsr_A100_v4", 96, 1900, "StandardNDAMSv4_A100Family", 8, "A100", 640),
        _gpu("NC40ads_H100_v5", 40, 320, "StandardNCadsH100v5Family", 1, "H100", 94),
        _gpu("NC80adis_H100_v5", 80, 640, "StandardNCadsH100v5Family", 2, "H100", 188),
        _gpu("ND96isr_H100_v5", 96, 1900, "StandardNDISRH100V5Family", 8, "H100", 640),
        _gpu("NCC40ads_H100_v5", 40, 320, "StandardNCCadsH100v5Family", 1, "H100", 94),
        _gpu("ND96isr_H200_v5", 96, 1850, "standardNDISRH200V5Family", 8, "H200", 1128),
        _gpu("NV36ads_A10_v5", 36, 440, "StandardNVADSA10v5Family", 1, "A10", 24),
        _gpu("NV72ads_A10_v5", 72, 880, "StandardNVADSA10v5Family", 2, "A10", 48),
        _gpu("NG32ads_V620_v1", 32, 64, "StandardNGADSV620v1Family", 1, "V620", 32, AMD_GPU_RESOURCE),
        _gpu("NG32adms_V620_v1", 32, 176, "StandardNGADSV620v1Family", 1, "V620", 32, AMD_GPU_RESOURCE),
        _gpu("NV32as_v4", 32, 112, "StandardNVASv4Family", 1, "MI25", 16, AMD_GPU_RESOURCE),
        _gpu("NV12s_v3", 12, 112, "standardNVSv3Family", 1, "M60", 8),
        _gpu("NV24s_v3", 24, 224, "standardNVSv3Family", 2, "M60", 16),
        _gpu("NV48s_v3", 48, 448, "standardNVSv3Family", 4, "M60", 32),
        # NV-series (M60): in Kaito's list up to v0.8; retired by Azure, so a live catalogue no longer offers it.
        _gpu("NV6", 6, 56, "standardNVFamily", 1, "M60", 8),
        _gpu("NV12", 12, 112, "standardNVFamily", 2, "M60", 16),
        _gpu("NV24", 24, 224, "standardNVFamily", 4, "M60", 32),
        *(
            VmSize(f"Standard_{name}", vcpus, vcpus * 4, family)
            for family, names in (
                ("standardDSv5Family", ("D2s_v5", "D4s_v5", "D8s_v5", "D16s_v5", "D32s_v5")),
                ("standardDv5Family", ("D2_v5", "D4_v5", "D8_v5", "D16_v5")),
                ("standardDDSv5Family", ("D4ds_v5", "D8ds_v5", "D16ds_v5")),
                ("standardDASv5Family", ("D4as_v5", "D8as_v5", "D16as_v5")),
                ("standardDADSv5Family", ("D4ads_v5", "D8ads_v5", "D16ads_v5")),
                ("standardDSv4Family", ("D2s_v4", "D4s_v4", "D8s_v4", "D16s_v4")),
                ("standardDv4Family", ("D2_v4", "D4_v4", "D8_v4", "D16_v4")),
                ("standardDSv3Family", ("D2s_v3", "D4s_v3", "D8s_v3", "D16s_v3")),
            )
            for name in names
            # The vCPU count is in the name (D4s_v5: 4 vCPUs); these general-purpose sizes have 4 GiB a vCPU.
            for vcpus in (int(name[1:].split("_")[0].rstrip("adsp")),)
        ),
        VmSize("Standard_DS2_v2", 2, 7, "standardDSv2Family"),
    )
}


def lookup(name: str) -> VmSize | None:
    """The size called `name`; ARM treats VM size names case-insensitively."""
    size = CATALOGUE.get(name)
    if size is not None:
        return size
    folded = name.casefold()
    return next((s for s in CATALOGUE.values() if s.name.casefold() == folded), None)
