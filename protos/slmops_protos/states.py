"""A device's update state, as the agent persists it and reports it and the fleet records it.

Stable names: the same strings are the protobuf enum's value names (`fleet.v1.UpdateState`), the
agent's `state.json` and the fleet's per-device rollout state.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmops_protos.fleet.v1 import fleet_pb2


class UpdateState(str, enum.Enum):
    IDLE = "IDLE"
    FETCHING = "FETCHING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    TESTING = "TESTING"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"

    def to_pb(self) -> fleet_pb2.UpdateState.ValueType:
        from slmops_protos.fleet.v1 import fleet_pb2  # the generated code loads only where it is used

        return fleet_pb2.UpdateState.Value(self.value)
