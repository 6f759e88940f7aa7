"""Prices: integration over spot price changes, the Pricing API's response shape (Stubber), a real
DescribeSpotPriceHistory call against moto's EC2 endpoint, the bundled table and overrides."""

from __future__ import annotations

import datetime as dt
import json
import time

import boto3
import pytest
from botocore.stub import ANY, Stubber

from runner.cost import pricing
from runner.cost.pricing import integrate
from runner.notices.ec2 import InstanceFacts

FACTS = InstanceFacts(cloud="ec2", instance_id="i-1", instance_type="g5.xlarge", availability_zone="us-east-1a",
                      region="us-east-1", lifecycle="spot")


def test_integrate_over_price_changes() -> None:
    h = [(0.0, 1.0), (1800.0, 2.0), (5400.0, 0.5)]
    assert integrate(h, 0, 3600) == pytest.approx(0.5 + 1.0)
    assert integrate(h, 900, 7200) == pytest.approx(0.25 * 1 + 1.0 * 2 + 0.5 * 0.5)
    assert integrate(list(reversed(h)), 900, 7200) == pytest.approx(2.5)  # order does not matter
    assert integrate([(1000.0, 3.0)], 0, 3600) == pytest.approx(3.0)  # before the first entry: its price
    assert integrate(h, 100, 100) == 0 and integrate([], 0, 3600) == 0


def _price_list_entry(usd: str, unit: str = "Hrs") -> str:
    """One GetProducts PriceList entry, shaped as AWS sends it: a JSON document inside a string."""
    sku, offer, rate = "DQ578CGN99KG6ECF", "JRTCKXETXF", "6YS6EN2CT7"
    return json.dumps({
        "product": {"productFamily": "Compute Instance", "sku": sku, "attributes": {
            "instanceType": "g5.xlarge", "regionCode": "us-east-1", "operatingSystem": "Linux", "tenancy": "Shared",
            "preInstalledSw": "NA", "capacitystatus": "Used", "servicecode": "AmazonEC2"}},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.{offer}": {
            "priceDimensions": {f"{sku}.{offer}.{rate}": {
                "unit": unit, "endRange": "Inf", "description": f"${usd} per On Demand Linux g5.xlarge Instance Hour",
                "appliesTo": [], "rateCode": f"{sku}.{offer}.{rate}", "beginRange": "0",
                "pricePerUnit": {"USD": usd}}},
            "sku": sku, "effectiveDate": "2024-06-01T00:00:00Z", "offerTermCode": offer, "termAttributes": {}}}},
        "version": "20240601000000", "publicationDate": "2024-06-01T00:00:00Z"})


def test_on_demand_price_from_the_pricing_api_response_shape() -> None:
    client = boto3.client("pricing", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": [
            _price_list_entry("0.0000000000"), _price_list_entry("1.0060000000")]},
            {"ServiceCode": "AmazonEC2", "MaxResults": 10, "Filters": ANY})
        assert pricing.on_demand_price("g5.xlarge", "us-east-1", client=client) == pytest.approx(1.006)
        stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": []}, None)
        assert pricing.on_demand_price("g5.xlarge", "us-east-1", client=client) is None
        stub.add_client_error("get_products", "ThrottlingException")
        assert pricing.on_demand_price("g5.xlarge", "us-east-1", client=client) is None
        stub.assert_no_pending_responses()
    assert pricing.parse_price_list([_price_list_entry("3.5", unit="Quantity")]) is None


def test_spot_price_history_is_a_real_call_against_moto_ec2(s3_env: dict[str, str]) -> None:
    now = time.time()
    history = pricing.spot_price_history("t3.micro", "us-east-1a", now - 3600, now, region="us-east-1")
    assert history, "moto answers DescribeSpotPriceHistory with its static prices"
    assert all(isinstance(t, float) and usd >= 0 for t, usd in history)
    # And the call is made the way the report makes it: the schedule integrates.
    assert integrate(history, now - 3600, now) == pytest.approx(history[-1][1])


def test_spot_history_from_a_stubbed_ec2_with_a_price_change() -> None:
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    t = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    with Stubber(client) as stub:
        stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [
            {"AvailabilityZone": "us-east-1a", "InstanceType": "g5.xlarge", "ProductDescription": "Linux/UNIX",
             "SpotPrice": "0.6000", "Timestamp": t + dt.timedelta(minutes=30)},
            {"AvailabilityZone": "us-east-1a", "InstanceType": "g5.xlarge", "ProductDescription": "Linux/UNIX",
             "SpotPrice": "0.3000", "Timestamp": t - dt.timedelta(hours=2)}]})
        history = pricing.spot_price_history("g5.xlarge", "us-east-1a", t.timestamp(), t.timestamp() + 3600,
                                             client=client)
    assert history == [((t - dt.timedelta(hours=2)).timestamp(), 0.3),
                       ((t + dt.timedelta(minutes=30)).timestamp(), 0.6)]
    assert integrate(history, t.timestamp(), t.timestamp() + 3600) == pytest.approx(0.15 + 0.30)


def test_start_prices_overrides_table_and_unknown() -> None:
    paid, od = pricing.start_prices(FACTS, price_override=0.4, on_demand_override=1.1, lookup=False)
    assert (paid.usd_per_hour, paid.source, od.usd_per_hour, od.source) == (0.4, "override", 1.1, "override")
    paid, od = pricing.start_prices(FACTS, lookup=False)
    table = pricing.bundled_table()
    assert od.usd_per_hour == table["on_demand"]["g5.xlarge"] and table["date"] in od.source
    assert paid.usd_per_hour == od.usd_per_hour and "spot price unknown" in paid.source  # an upper bound, said so
    on_demand_facts = InstanceFacts("ec2", "i-2", "p3.2xlarge", "us-east-1b", "us-east-1", "on-demand")
    paid, od = pricing.start_prices(on_demand_facts, lookup=False)
    assert paid == od and paid.usd_per_hour == 3.06
    paid, od = pricing.start_prices(None, lookup=False)
    assert paid.usd_per_hour is None and od.usd_per_hour is None and paid.source == "unknown"


def test_the_bundled_table_is_dated_and_sourced() -> None:
    table = pricing.bundled_table()
    assert table["source"] and dt.date.fromisoformat(table["date"])
    assert table["checked"]["against"] and all(s["what"] and s["states"] for s in table["checked"]["against"])
    assert all(isinstance(v, float) and v > 0 for v in table["on_demand"].values())
