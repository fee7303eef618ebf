"""Reading Prometheus metrics in tests: from a registry in this process, or from an exposition
fetched over HTTP and parsed with ``prometheus_client.parser`` (what a scraper sees)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families


def sum_samples(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sample ``name`` summed over every label not given: ``sum_samples(r, "x_total",
    model="m")`` adds up every node and status. 0.0 when nothing matches."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class Exposition:
    """A parsed ``/metrics`` text, queried like :func:`sum_samples`."""

    def __init__(self, text: str) -> None:
        self.text = text
        families = list(text_string_to_metric_families(text))
        self.samples = [s for f in families for s in f.samples]
        self.families = {f.name for f in families}
        # family name -> counter | gauge | histogram | ...
        self.types = {f.name: f.type for f in families}

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        """Every sample name (``x_total``, ``x_bucket``...) and family name exposed."""
        return {s.name for s in self.samples} | self.families
