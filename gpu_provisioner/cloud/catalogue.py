"""The region's VM sizes and vCPU quota as Azure tells them, and the pre-flight check made before a PUT.

Sizes come from ARM's Resource SKUs API (vCPUs, GPUs, quota family, restrictions), read at most once per
`sku_interval_s`; quota from the Compute Usages API, read at most once per `quota_interval_s`. Both reads
are shared by every claim: a worker that needs one while another is reading waits for its answer. When
Azure refuses or cannot be reached, sizes come from the built-in table (cloud/skus.py) and the quota check
is left to AKS, which judges every PUT anyway; which source is in use is logged when it changes and exported
as `gpu_provisioner_azure_catalogue_live`.

Pools this controller has asked for since the last usage read are counted as in flight, so that ten
claims launched within one interval do not all pass on the same stale usage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import structlog

from gpu_provisioner import metrics
from gpu_provisioner.cloud.errors import CapacityError, CloudError, QuotaExceededError, SkuUnavailableError
from gpu_provisioner.cloud.skus import VmSize, lookup

log = structlog.get_logger(__name__)

# The Usages API's name for the regional vCPU total that every family also counts against.
REGIONAL_VCPUS = "cores"


class ComputeApi(Protocol):
    def vm_sizes(self, location: str) -> list[dict[str, Any]]: ...

    def usages(self, location: str) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Offer:
    """One size as the region's Resource SKUs list it."""

    size: VmSize
    # Why the size may not be deployed in the region at all (a Location restriction's reason code), or "".
    restricted: str = ""
    # The region's zones that offer the size, and those of them it may not be deployed in. A regional pool
    # (what this controller creates) still can be while one zone is left.
    zones: tuple[str, ...] = ()
    restricted_zones: tuple[str, ...] = ()

    @property
    def restricted_in_every_zone(self) -> bool:
        return bool(self.zones) and set(self.zones) <= set(self.restricted_zones)


@dataclass(frozen=True)
class Usage:
    name: str
    current: int
    limit: int


def _capability(sku: dict[str, Any], name: str) -> str:
    return next((c.get("value", "") for c in sku.get("capabilities") or [] if c.get("name") == name), "")


def _number(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


def parse_offers(skus: list[dict[str, Any]], location: str) -> dict[str, Offer]:
    """Offers by lower-case size name, from the Resource SKUs of virtual machines (as ARM sends them)."""
    offers: dict[str, Offer] = {}
    region = location.casefold()
    for sku in skus:
        if sku.get("resourceType", "virtualMachines") != "virtualMachines":
            continue
        if region not in {loc.casefold() for loc in sku.get("locations") or []}:
            continue
        name = sku.get("name", "")
        known = lookup(name)
        vcpus = _number(_capability(sku, "vCPUs"))
        gpus = _number(_capability(sku, "GPUs"))
        memory = _number(_capability(sku, "MemoryGB"))
        # Azure says how many vCPUs and GPUs and which quota family; the GPU model, its memory and the
        # resource its device plugin publishes come from the built-in table when it knows the size.
        size = VmSize(name, vcpus, memory, sku.get("family", ""), gpus)
        if known is not None:
            size = replace(known, name=name, vcpus=vcpus or known.vcpus, memory_gib=memory or known.memory_gib,
                           family=size.family or known.family, gpu_count=gpus or known.gpu_count)
        restricted, restricted_zones = "", set()
        for restriction in sku.get("restrictions") or []:
            if region not in {v.casefold() for v in restriction.get("values") or []}:
                continue
            if restriction.get("type") == "Location":
                restricted = restriction.get("reasonCode") or "Restricted"
            elif restriction.get("type") == "Zone":
                restricted_zones.update((restriction.get("restrictionInfo") or {}).get("zones") or [])
        zones = {zone for info in sku.get("locationInfo") or [] if info.get("location", "").casefold() == region
                 for zone in info.get("zones") or []}
        offers[name.casefold()] = Offer(size, restricted, tuple(sorted(zones)), tuple(sorted(restricted_zones)))
    return offers


def parse_usages(usages: list[dict[str, Any]]) -> dict[str, Usage]:
    """Usages by lower-case quota name (a family such as standardNCSv3Family, or "cores")."""
    parsed = {}
    for usage in usages:
        name = (usage.get("name") or {}).get("value", "")
        if name:
            parsed[name.casefold()] = Usage(name, int(usage.get("currentValue") or 0), int(usage.get("limit") or 0))
    return parsed


class _CachedRead:
    """One Azure read shared by every caller, repeated at most once per interval; None while Azure refuses,
    when `fallback` (said in the log) is what the controller does instead."""

    def __init__(self, api: str, region: str, interval_s: float, read: Callable[[], Any],
                 clock: Callable[[], float], fallback: str) -> None:
        self.api, self.region, self.interval_s, self.fallback = api, region, interval_s, fallback
        self._read, self._clock = read, clock
        self._lock = threading.Lock()
        self._value: Any = None
        self._read_at = float("-inf")
        self.started_at = float("-inf")
        self._live: bool | None = None

    def get(self) -> Any:
        with self._lock:
            if self._clock() - self._read_at < self.interval_s:
                return self._value
            started = self._clock()
            try:
                self._value, error = self._read(), None
            except CloudError as failure:
                self._value, error = None, failure
            self._read_at = self.started_at = started
            self._say(error)
            return self._value

    def _say(self, error: CloudError | None) -> None:
        live = error is None
        metrics.CATALOGUE_LIVE.labels(region=self.region, api=self.api).set(1 if live else 0)
        if live == self._live:
            return
        self._live = live
        if live:
            log.info("Azure answers; using its live data", api=self.api, region=self.region)
        else:
            log.warning(f"Azure refused or is unreachable; using {self.fallback}", api=self.api, region=self.region,
                        error=error.describe() if error else "", error_class=error.reason if error else "",
                        retry_in_s=self.interval_s)


class _Reservation(NamedTuple):
    at: float  # the catalogue's clock
    buckets: tuple[str, ...]  # the quotas it counts against
    vcpus: int
    holder: str  # the claim whose PUT it is for


class SizeCatalogue:
    """VM sizes and the pre-flight for one region; without `compute`, the built-in table and no pre-flight."""

    def __init__(self, compute: ComputeApi | None = None, location: str = "", sku_interval_s: float = 3600.0,
                 quota_interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.location = location
        self._clock = clock
        self._offers: _CachedRead | None = None
        self._usages: _CachedRead | None = None
        if compute is not None:
            self._offers = _CachedRead("resource_skus", location, sku_interval_s,
                                       lambda: parse_offers(compute.vm_sizes(location), location), clock,
                                       fallback="the built-in VM size table")
            self._usages = _CachedRead("usages", location, quota_interval_s,
                                       lambda: parse_usages(compute.usages(location)), clock,
                                       fallback="no quota pre-flight (AKS judges each PUT)")
        self._quota_lock = threading.Lock()
        # The pools reserved since the last usage read began.
        self._in_flight: list[_Reservation] = []

    def warm_up(self) -> None:
        """Read both once, so that the log and the metric say at start-up which data is in use."""
        for read in (self._offers, self._usages):
            if read is not None:
                read.get()

    def size(self, name: str) -> VmSize | None:
        """The size called `name`, as the region's live catalogue or else the built-in table describes it."""
        offers = self._offers.get() if self._offers else None
        if offers is None:
            return lookup(name)
        offer = offers.get(name.casefold())
        # A size the region does not list is still a size: the pre-flight says it is not offered here.
        return offer.size if offer is not None else lookup(name)

    def reserve(self, size: VmSize, holder: str) -> CapacityError | None:
        """The pre-flight before the PUT of `holder` (a claim: one PUT of its at a time): why the size cannot be had
        now, or None after counting it in flight (`release` undoes that when the PUT is not carried out)."""
        refusal = self._restriction(size) or self._reserve_quota(size, holder)
        if refusal is not None:
            metrics.PREFLIGHT_REFUSALS.labels(reason=refusal.reason).inc()
        return refusal

    def release(self, holder: str) -> None:
        """Undo `holder`'s last reservation, if a usage read begun since has not dropped it: by holder, not by size, or
        a refused PUT would free the vCPUs of another one still in flight, and let one PUT too many through. (An
        earlier one of the holder stands: kept for a PUT that may have landed.)"""
        with self._quota_lock:
            for index in range(len(self._in_flight) - 1, -1, -1):
                if self._in_flight[index].holder == holder:
                    del self._in_flight[index]
                    return

    def _restriction(self, size: VmSize) -> CapacityError | None:
        offers = self._offers.get() if self._offers else None
        if offers is None:
            return None
        offer = offers.get(size.name.casefold())
        if offer is None:
            return SkuUnavailableError(f"{size.name} is not offered in {self.location} (Resource SKUs); "
                                       "no request was sent", "SkuNotAvailable")
        if offer.restricted:
            return SkuUnavailableError(f"{size.name} is restricted in {self.location} for this subscription "
                                       f"({offer.restricted}, Resource SKUs); no request was sent", offer.restricted)
        if offer.restricted_in_every_zone:
            return SkuUnavailableError(f"{size.name} is restricted in every zone of {self.location} "
                                       f"({', '.join(offer.restricted_zones)}) for this subscription (Resource SKUs); "
                                       "no request was sent", "NotAvailableForSubscription")
        return None

    @staticmethod
    def _buckets(size: VmSize) -> tuple[str, ...]:
        return (size.family.casefold(), REGIONAL_VCPUS)

    def _reserve_quota(self, size: VmSize, holder: str) -> CapacityError | None:
        if self._usages is None:
            return None
        with self._quota_lock:
            usages = self._usages.get()
            if usages is None:
                return None
            since = self._usages.started_at
            # A usage read that began after a reservation counts that pool itself.
            self._in_flight = [entry for entry in self._in_flight if entry.at >= since]
            buckets = self._buckets(size)
            for bucket in buckets:
                usage = usages.get(bucket)
                if usage is None:
                    continue
                in_flight = sum(entry.vcpus for entry in self._in_flight if bucket in entry.buckets)
                if usage.current + in_flight + size.vcpus > usage.limit:
                    what = "regional vCPU" if bucket == REGIONAL_VCPUS else f"{usage.name} vCPU"
                    return QuotaExceededError(
                        f"{what} quota in {self.location} is used up for {size.name}: limit {usage.limit}, usage "
                        f"{usage.current}, in flight from gpu-provisioner {in_flight}, need {size.vcpus} "
                        "(Usages API); no request was sent", "QuotaExceeded")
            self._in_flight.append(_Reservation(self._clock(), buckets, size.vcpus, holder))
            return None
