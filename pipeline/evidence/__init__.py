"""`xrai evidence`: controlled phantom studies of the loss-configuration rules.

`pipeline.evidence.families` defines the phantom families (datasets that change one
property at a time) and the rule outcomes each arm is built to trigger.
"""

from __future__ import annotations

from pipeline.evidence.families import (
    FAMILIES,
    RULE_IDS,
    Arm,
    Family,
    get_family,
    write_arm,
)

__all__ = ["FAMILIES", "RULE_IDS", "Arm", "Family", "get_family", "write_arm"]
