"""Fetch and parse one ``/metrics`` endpoint (Prometheus text exposition format 0.0.4).

Only what `apex-local top` and the tests need: samples as (name, labels, value); comments,
timestamps and exemplars are ignored. No prometheus_client import (STYLE.md #11).
"""
from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def parse_text(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of an exposition; malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = {}
        if m.group(2):
            for k, v in _LABEL.findall(m.group(2)):
                labels[k] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], v)
        try:
            out.append((m.group(1), labels, _value(m.group(3))))
        except ValueError:
            continue
    return out


@dataclass
class Scrape:
    """One scrape of one process: ``ok`` False with ``error`` when it could not be read."""
    ok: bool
    time: float
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    error: str = ""

    def get(self, name: str, default: float | None = None, **match: str) -> float | None:
        """Sum of the samples of ``name`` whose labels include ``match``; ``default`` if none."""
        found = [v for n, labels, v in self.samples
                 if n == name and all(labels.get(k) == val for k, val in match.items())]
        return sum(found) if found else default

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, labels, v in self.samples:
            if n == name and label in labels:
                out[labels[label]] = out.get(labels[label], 0.0) + v
        return out


def scrape(url: str, timeout: float = 1.0, now: float | None = None) -> Scrape:
    """Read an endpoint; never raises for a process that is down, hung or not an exporter."""
    import time

    t = time.monotonic() if now is None else now
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        return Scrape(False, t, error=str(getattr(exc, "reason", exc)))
    except (OSError, ValueError) as exc:  # timeouts, resets, bad status lines
        return Scrape(False, t, error=str(exc) or type(exc).__name__)
    return Scrape(True, t, parse_text(text))
