"""The schema of a route's `health_check`: true, false, or the check's own keys."""

from __future__ import annotations

from typing import Any

import yaml

from splicerelay.config.model import MAX_HEALTH_COUNT, HealthCheck
from splicerelay.config.nodes import boolean_value, describe
from splicerelay.config.units import format_duration
from splicerelay.config.values import ValueReader

HEALTH_CHECK_KEYS = ("interval", "timeout", "rise", "fall", "send", "expect")


def read_health_check(reader: ValueReader, node: yaml.Node, path: str) -> HealthCheck | None:
    """The active checks `node` asks for: true is all defaults, false none. None when
    there are none, or when a problem was reported."""
    enabled = boolean_value(node)
    if enabled is not None:
        return HealthCheck() if enabled else None
    if not isinstance(node, yaml.MappingNode):
        reader.report(node, path, f"expected a mapping, true or false, got {describe(node)}")
        return None
    section = reader.mapping(node, path, HEALTH_CHECK_KEYS)
    if section is None:
        return None
    fields = section.fields
    problems = len(reader.problems)
    changes: dict[str, Any] = {}
    for key in ("interval", "timeout"):
        if key in fields:
            changes[key] = reader.duration(fields[key], f"{path}.{key}")
    for key in ("rise", "fall"):
        if key in fields:
            changes[key] = reader.integer(fields[key], f"{path}.{key}", 1, MAX_HEALTH_COUNT)
    if "send" in fields:
        changes["send"] = reader.payload(fields["send"], f"{path}.send", "to send nothing")
    if "expect" in fields:
        changes["expect"] = reader.payload(fields["expect"], f"{path}.expect", "to need no reply")
    if len(reader.problems) > problems:
        return None
    check = HealthCheck(**changes)
    if check.timeout <= check.interval:
        return check
    interval, timeout = format_duration(check.interval), format_duration(check.timeout)
    if "timeout" in fields:
        message = f"{timeout} is longer than the interval ({interval})"
        reader.report(fields["timeout"], f"{path}.timeout", message)
    else:
        message = (
            f"{interval} is shorter than the default timeout ({timeout});"
            f" set a timeout of at most {interval}"
        )
        reader.report(fields["interval"], f"{path}.interval", message)
    return None
