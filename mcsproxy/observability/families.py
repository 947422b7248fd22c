"""Metric families as plain data: built at scrape time, merged across worker processes,
turned into prometheus-client families for the exposition.

A family maps label values to a number (counter, gauge) or to bucket counts and a sum
(histogram). Workers send theirs as JSON; `merge` sums counters and histograms, and
gauges only where a sum means something (active connections). A worker that restarts
has its last report kept in `retired` so the merged counters never go backwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from mcsproxy.observability.stats import Buckets


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    summed: bool = True  # gauges: whether workers' values add up (active connections do)
    bounds: tuple[float, ...] = ()  # histograms
    values: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def add(self, labels: Sequence[str], value: float) -> None:
        key = tuple(labels)
        self.values[key] = self.values.get(key, 0) + value

    def observe_buckets(self, labels: Sequence[str], buckets: Buckets) -> None:
        key = tuple(labels)
        old = self.values.get(key)
        if old is None:
            self.values[key] = [list(buckets.counts), buckets.sum]
        else:
            old[0] = [a + b for a, b in zip(old[0], buckets.counts, strict=True)]
            old[1] += buckets.sum

    def total(self, **match: str) -> float:
        """Sum over the series whose labels match (histograms: their counts)."""
        out = 0.0
        for key, value in self.values.items():
            labels = dict(zip(self.labels, key, strict=True))
            if all(labels.get(k) == v for k, v in match.items()):
                out += sum(value[0]) if self.kind == "histogram" else value
        return out

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector interface: generate_latest(family) renders it."""
        yield self.to_prometheus()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "help": self.help,
                "labels": list(self.labels), "summed": self.summed, "bounds": list(self.bounds),
                "values": [[list(k), v] for k, v in self.values.items()]}

    def pieces(self, size: int) -> Iterator[Family]:
        """This family as families of at most `size` series each, in its own order (each
        sorted within: see to_prometheus), for a render in parts (admin._render)."""
        if len(self.values) <= size:
            yield self
            return
        items = iter(self.values.items())
        while chunk := dict(islice(items, size)):
            yield Family(self.name, self.kind, self.help, self.labels, self.summed,
                         self.bounds, chunk)

    def exposition(self, size: int) -> Iterator[bytes]:
        """This family in the text format, the bytes generate_latest(self) makes, in parts
        of at most `size` series (each sorted within, as pieces()), HELP and TYPE in the
        first. Written here rather than by prometheus-client, which makes a Sample and a
        labels dict for every line and escapes and sorts each line's labels anew: about
        7 us a line, 11 s of CPU for the 1.55M lines of 6,000 services of 2 ports in 3
        clusters (each series' label text is made once here, whatever its line count)."""
        for i, piece in enumerate(self.pieces(size)):
            lines = [self._head()] if i == 0 else []
            piece._lines(lines)
            yield "".join(lines).encode()

    def _head(self) -> str:
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        help_text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {help_text}\n# TYPE {name} {self.kind}\n"

    def _lines(self, out: list[str]) -> None:
        """Append this family's sample lines, in sorted label-value order."""
        escaped: dict[str, str] = {}
        # prometheus-client writes a line's labels sorted by name; a histogram's `le`
        # among them, so its buckets get the text before and after `le`.
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        before_le = [i for i in order if self.labels[i] < "le"]
        after_le = [i for i in order if self.labels[i] >= "le"]
        items = sorted(self.values.items())
        if self.kind != "histogram":
            name = f"{self.name}_total" if self.kind == "counter" else self.name
            for key, value in items:
                labels = _label_text(self.labels, order, key, escaped)
                out.append(f"{name}{{{labels}}} {_go_float(value)}\n" if labels
                           else f"{name} {_go_float(value)}\n")
            return
        bounds = ["+Inf" if b == float("inf") else repr(b) for b in (*self.bounds, float("inf"))]
        with_count = not self.bounds or self.bounds[0] >= 0  # as HistogramMetricFamily
        bucket, count, total = f"{self.name}_bucket", f"{self.name}_count", f"{self.name}_sum"
        for key, (counts, sum_value) in items:
            left = _label_text(self.labels, before_le, key, escaped)
            right = _label_text(self.labels, after_le, key, escaped)
            left = f"{bucket}{{{left}," if left else f"{bucket}{{"
            right = f",{right}}} " if right else "} "
            acc = 0
            for bound, n in zip(bounds, counts, strict=True):
                acc += n
                out.append(f'{left}le="{bound}"{right}{_go_float(acc)}\n')
            if with_count:
                labels = _label_text(self.labels, order, key, escaped)
                if labels:
                    out.append(f"{count}{{{labels}}} {_go_float(acc)}\n"
                               f"{total}{{{labels}}} {_go_float(sum_value)}\n")
                else:
                    out.append(f"{count} {_go_float(acc)}\n{total} {_go_float(sum_value)}\n")

    def to_prometheus(self) -> Metric:
        if self.kind == "counter":
            c = CounterMetricFamily(self.name, self.help, labels=self.labels)
            for key, value in sorted(self.values.items()):
                c.add_metric(key, value)
            return c
        if self.kind == "gauge":
            g = GaugeMetricFamily(self.name, self.help, labels=self.labels)
            for key, value in sorted(self.values.items()):
                g.add_metric(key, value)
            return g
        h = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for key, (counts, total) in sorted(self.values.items()):
            acc = 0
            buckets = []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            h.add_metric(key, buckets, total)
        return h


class Families:
    """Every family of one process (or the merge of several), by metric name."""

    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def family(self, name: str, kind: str, help: str, labels: Iterable[str] = (),
               *, summed: bool = True, bounds: Sequence[float] = ()) -> Family:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = Family(name, kind, help, tuple(labels), summed,
                                              tuple(bounds))
        return fam

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Family:
        return self.family(name, "counter", help, labels)

    def gauge(self, name: str, help: str, labels: Iterable[str] = (),
              summed: bool = False) -> Family:
        return self.family(name, "gauge", help, labels, summed=summed)

    def histogram(self, name: str, help: str, labels: Iterable[str],
                  bounds: Sequence[float]) -> Family:
        return self.family(name, "histogram", help, labels, bounds=bounds)

    def __getitem__(self, name: str) -> Family:
        return self.by_name[name]

    def __iter__(self) -> Iterator[Family]:
        return iter(self.by_name.values())

    def merge(self, other: Families, *, counters_only: bool = False) -> None:
        """Add another process's families: counters and histograms sum, summed gauges sum,
        other gauges are kept from this process (a worker's view is not the operator's)."""
        for fam in other:
            self.merge_family(fam, counters_only=counters_only)

    def merge_family(self, fam: Family, *, counters_only: bool = False) -> None:
        """merge() of one family (or a part of one: Family.pieces)."""
        if fam.kind == "gauge" and (counters_only or not fam.summed):
            return
        mine = self.family(fam.name, fam.kind, fam.help, fam.labels, summed=fam.summed,
                           bounds=fam.bounds)
        for key, value in fam.values.items():
            if fam.kind == "histogram":
                old = mine.values.get(key)
                if old is None:
                    mine.values[key] = [list(value[0]), value[1]]
                else:
                    old[0] = [a + b for a, b in zip(old[0], value[0], strict=True)]
                    old[1] += value[1]
            else:
                mine.values[key] = mine.values.get(key, 0) + value

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Families:
        out = cls()
        for f in data:
            out.add_json(f)
        return out

    def add_json(self, f: dict[str, Any]) -> None:
        """A family's (or a part's) Family.to_json: its series join those already here."""
        fam = self.family(f["name"], f["kind"], f["help"], f["labels"],
                          summed=f["summed"], bounds=f["bounds"])
        for key, value in f["values"]:
            fam.values[tuple(key)] = value

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector interface, so generate_latest(families) works."""
        for fam in self:
            yield fam.to_prometheus()


def _label_text(names: tuple[str, ...], order: Sequence[int], key: tuple[str, ...],
                escaped: dict[str, str]) -> str:
    """`name="value",...` of the labels at `order`, values escaped as the text format says
    (memoised in `escaped`: the same few services, ports and clusters recur)."""
    parts = []
    for i in order:
        value = key[i]
        text = escaped.get(value)
        if text is None:
            text = escaped[value] = \
                value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
        parts.append(f'{names[i]}="{text}"')
    return ",".join(parts)


def _go_float(value: float) -> str:
    """floatToGoString(value), without its float() and checks for the common small int."""
    if type(value) is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)


async def drop_gradually(families: Families, series_per_turn: int = 5000) -> None:
    """Empty `families`, a turn of the loop every `series_per_turn` series: freed at once,
    the 500,000 series of 10,000 services took 36-46 ms."""
    for family in families:
        keys = list(family.values)
        for start in range(0, len(keys), series_per_turn):
            for key in keys[start:start + series_per_turn]:
                del family.values[key]
            await asyncio.sleep(0)
