"""Reading one sample from a service's /metrics, as a scraper would."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def sample(base_url: str, name: str, **labels: str) -> float:
    """The value of the sample `name{labels}` (exactly those labels), 0 when absent."""
    text = httpx.get(f"{base_url}/metrics").raise_for_status().text
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    return 0.0
