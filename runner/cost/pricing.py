"""Instance prices and where each came from.

Owns: the price an attempt records at start (overrides first, then AWS's
own answers, then the bundled table), the EC2 spot price history of a
segment and its integral over price changes, the Pricing API's on-demand
price, and the bundled dated table (prices.json) for when AWS cannot be
asked.  Every price travels with its `source`, which the report prints.

Why this module talks to boto3 directly, not through runner.storage: these
are EC2 and Pricing API calls, not object storage.  Every call is bounded
(short timeouts, one retry) and never raises: a price we cannot get is
unknown, and a run must not fail over its bill.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

log = logging.getLogger("runner.cost")

SRC_OVERRIDE = "override"
SRC_SPOT_HISTORY = "ec2-spot-price-history"
SRC_PRICING_API = "aws-pricing-api"
SRC_TABLE = "bundled-table"
SRC_UNKNOWN = "unknown"

PRICING_REGION = "us-east-1"  # the Pricing API answers in us-east-1 (and ap-south-1) only


@dataclass(frozen=True)
class Price:
    usd_per_hour: float | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"usd_per_hour": self.usd_per_hour, "source": self.source}

    @classmethod
    def from_json(cls, raw: Any) -> "Price":
        if not isinstance(raw, dict):
            return UNKNOWN
        value = raw.get("usd_per_hour")
        return cls(float(value) if value is not None else None, str(raw.get("source") or SRC_UNKNOWN))


UNKNOWN = Price(None, SRC_UNKNOWN)


# -- integrating a price that changes --------------------------------------------


def integrate(history: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """USD for [start, end] (UNIX seconds) at the hourly prices in `history`: (effective from, usd/h).

    The price in force at a time is the newest entry at or before it; before
    the first entry, the first entry's price (AWS's history starts with the
    price in force at the requested start).  0 for an empty history or span.
    """
    if not history or end <= start:
        return 0.0
    points = sorted(history)
    total = 0.0
    for i, (effective, usd_per_hour) in enumerate(points):
        begin = start if i == 0 else max(start, effective)
        until = end if i + 1 == len(points) else min(end, points[i + 1][0])
        if until > begin:
            total += (until - begin) * usd_per_hour / 3600.0
    return total


# -- the bundled table -------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bundled_table() -> dict[str, Any]:
    return json.loads(resources.files("runner.cost").joinpath("prices.json").read_text())


def table_on_demand(instance_type: str | None) -> Price | None:
    """The bundled on-demand price of `instance_type` (us-east-1), or None."""
    table = bundled_table()
    value = table["on_demand"].get(instance_type or "")
    if value is None:
        return None
    return Price(float(value), f"{SRC_TABLE} ({table['region']}, {table['date']})")


# -- AWS ---------------------------------------------------------------------------


def _client(service: str, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client(service, region_name=region or PRICING_REGION, config=config)


def spot_price_history(instance_type: str, availability_zone: str, start: float, end: float, *,
                       client: Any = None, region: str | None = None) -> list[tuple[float, float]]:
    """EC2 DescribeSpotPriceHistory for Linux/UNIX `instance_type` in one zone over [start, end].

    Returns [(effective from, usd/h)], oldest first; [] when AWS cannot be
    asked or has no answer (the failure is logged at debug level).
    """
    try:
        client = client or _client("ec2", region or availability_zone[:-1])
        paginator = client.get_paginator("describe_spot_price_history")
        pages = paginator.paginate(
            InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"],
            Filters=[{"Name": "availability-zone", "Values": [availability_zone]}],
            StartTime=dt.datetime.fromtimestamp(start, dt.timezone.utc),
            EndTime=dt.datetime.fromtimestamp(end, dt.timezone.utc))
        return parse_spot_history(entry for page in pages for entry in page.get("SpotPriceHistory", []))
    except Exception as exc:  # botocore's errors, no credentials, no network: the price is unknown
        log.debug("spot price history for %s in %s: %s", instance_type, availability_zone, exc)
        return []


def parse_spot_history(entries: Iterable[dict[str, Any]]) -> list[tuple[float, float]]:
    out = []
    for entry in entries:
        try:
            out.append((_timestamp(entry["Timestamp"]), float(entry["SpotPrice"])))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return sorted(out)


def _timestamp(value: Any) -> float:
    if isinstance(value, str):  # "2006-01-02T15:04:05.999999999Z": at most microseconds for Python
        value = dt.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def on_demand_price(instance_type: str, region: str, *, client: Any = None) -> float | None:
    """The Linux, shared-tenancy on-demand USD/h from the AWS Pricing API (GetProducts); None when unknown."""
    filters = [("instanceType", instance_type), ("regionCode", region), ("operatingSystem", "Linux"),
               ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used")]
    try:
        client = client or _client("pricing", PRICING_REGION)
        answer = client.get_products(
            ServiceCode="AmazonEC2", MaxResults=10,
            Filters=[{"Type": "TERM_MATCH", "Field": name, "Value": value} for name, value in filters])
        return parse_price_list(answer.get("PriceList", []))
    except Exception as exc:  # see spot_price_history
        log.debug("on-demand price of %s in %s: %s", instance_type, region, exc)
        return None


def parse_price_list(price_list: Iterable[str | dict[str, Any]]) -> float | None:
    """The first positive hourly USD on-demand price in GetProducts' PriceList (entries are JSON strings)."""
    for entry in price_list:
        product = json.loads(entry) if isinstance(entry, str) else entry
        for term in (product.get("terms", {}).get("OnDemand") or {}).values():
            for dimension in (term.get("priceDimensions") or {}).values():
                if str(dimension.get("unit", "")).lower() not in ("hrs", "hours", "hour"):
                    continue
                try:
                    usd = float(dimension.get("pricePerUnit", {}).get("USD", "0"))
                except ValueError:
                    continue
                if usd > 0:
                    return usd
    return None


# -- what an attempt records at start ---------------------------------------------


def is_override(source: str) -> bool:
    """True for a price a person set (`--price-per-hour`, with or without a label), not one looked up."""
    return source == SRC_OVERRIDE or source.startswith(f"{SRC_OVERRIDE}: ")


def override(usd_per_hour: float, label: str | None = None) -> Price:
    return Price(usd_per_hour, f"{SRC_OVERRIDE}: {label}" if label else SRC_OVERRIDE)


def start_prices(facts: Any, *, price_override: float | None = None, on_demand_override: float | None = None,
                 lookup: bool = True, at: float | None = None, price_label: str | None = None) -> tuple[Price, Price]:
    """(price paid, on-demand price) for an instance, each with its source.

    `facts` is an InstanceFacts (or None).  Order: the overrides; for EC2,
    the spot price in force now (DescribeSpotPriceHistory) or the on-demand
    price (Pricing API) when `lookup`; then the bundled table.  A spot
    instance with no known spot price is charged its on-demand price (an
    upper bound), and says so.
    """
    import time

    at = time.time() if at is None else at
    itype = getattr(facts, "instance_type", None)
    zone = getattr(facts, "availability_zone", None)
    region = getattr(facts, "region", None) or (zone[:-1] if zone else None)
    lifecycle = getattr(facts, "lifecycle", None)
    on_demand = Price(on_demand_override, SRC_OVERRIDE) if on_demand_override is not None else None
    if on_demand is None and lookup and itype and region and getattr(facts, "cloud", None) == "ec2":
        value = on_demand_price(itype, region)
        on_demand = Price(value, SRC_PRICING_API) if value is not None else None
    if on_demand is None:
        on_demand = table_on_demand(itype) or UNKNOWN
    if price_override is not None:
        return override(price_override, price_label), on_demand
    if lifecycle == "spot":
        if lookup and itype and zone and getattr(facts, "cloud", None) == "ec2":
            history = spot_price_history(itype, zone, at - 3600, at, region=region)
            if history:
                return Price(history[-1][1], SRC_SPOT_HISTORY), on_demand
        if on_demand.usd_per_hour is not None:
            return Price(on_demand.usd_per_hour, f"{on_demand.source}; on-demand price, spot price unknown"), on_demand
        return UNKNOWN, on_demand
    if lifecycle in ("on-demand", "normal", "scheduled"):
        return on_demand, on_demand
    return UNKNOWN, on_demand
