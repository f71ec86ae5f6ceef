"""Targets the report sets side by side, beyond each one's ratio to HAProxy (pure).

Two questions a ratio to the one-thread HAProxy baseline does not answer on its own:

- what the access log costs: ``relay`` (the defaults, access log on) over ``relay-nolog``
  (the same relay without it), in the same run;
- how the relay scales against HAProxy when both may use every proxy core:
  ``relay-auto`` (``workers: auto``) over ``haproxy-auto`` (``nbthread`` one per core).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splicerelay.bench.model import ScenarioResult, ratios_to_baseline, summarize


@dataclass(frozen=True)
class Pair:
    """`target`'s medians are divided by `reference`'s; `meaning` says what that shows."""

    target: str
    reference: str
    meaning: str

    @property
    def name(self) -> str:
        return f"{self.target} / {self.reference}"


PAIRS = (
    Pair("relay", "relay-nolog", "what the access log costs"),
    Pair("relay-auto", "haproxy-auto", "both on every proxy core"),
)


def pair_ratios(pair: Pair, result: ScenarioResult) -> dict[str, float | None] | None:
    """Each of the scenario's ratios of `pair.target` over `pair.reference`, by key; None
    unless both were measured in this scenario."""
    medians = summarize(result, [pair.target, pair.reference])
    if any(medians.get(name, {}).get("samples", 0) == 0 for name in (pair.target, pair.reference)):
        return None
    return ratios_to_baseline(result.scenario, medians, pair.reference)[pair.target]


def pairs_in(targets: Sequence[str]) -> list[Pair]:
    """The pairs whose two targets this run asked for."""
    return [pair for pair in PAIRS if pair.target in targets and pair.reference in targets]
