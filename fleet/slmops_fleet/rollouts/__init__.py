"""Rollouts: how a package or release reaches the fleet, wave by wave, and the rules that move it.

- `states`: the rollout, wave and target states (stored names).
- `waves`, `selectors`, `gates`, `plan`: the wave planner, device tags and selectors, the gates and
  their evaluation, and the plan that holds them (no database).
- `targeting`: named groups' membership and which assigned group a device follows (continuous
  targeting; the store's `targeting` applies it).
- `variants`: hardware-aware selection of a release's package for each device.
- `rules`: the state machine's decisions (create, advance, soak, gate, revert, pause/resume/cancel),
  run by the store inside its transactions.
- `driver`: the asyncio task that advances rollouts and publishes the desired states.
"""
