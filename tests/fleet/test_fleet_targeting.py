"""The selector language (parsing, errors with their column, evaluation), selector waves, group
membership and priority without a fleet, and continuous targeting in the store on SQLite and
PostgreSQL (reconcile: who gets a follow-up rollout, when, and when an assignment halts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_fleet_store import _enroll, _package

from slmops_fleet.errors import Conflict, InvalidRequest, NotFound
from slmops_fleet.rollouts import targeting
from slmops_fleet.rollouts.driver import RolloutDriver
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.selectors import DeviceFacts, SelectorError, parse_selector
from slmops_fleet.rollouts.targeting import GroupDef, Membership
from slmops_fleet.rollouts.waves import parse_waves, plan_waves
from slmops_fleet.store import Store
from slmops_fleet.store.records import NewPackage, ReportedUpdate

INV: dict[str, Any] = {"arch": "x86_64", "memory_bytes": 8e9, "providers": ["CPUExecutionProvider"], "os": "linux"}
DEV = DeviceFacts("dev-1", "edge 1", ["canary", "kiosk"], INV, lambda g: g == "lab")


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("tag=canary OR tag=beta", True),
        ("tag=beta OR arch=aarch64", False),
        ("tag=canary AND NOT tag=kiosk", False),
        ("not (tag=beta or tag=lab)", True),  # keywords in any case
        ("arch IN (x86_64, aarch64)", True),
        ("arch NOT IN (x86_64, aarch64)", False),
        ("tag IN (beta, kiosk)", True),
        ("providers IN (CUDAExecutionProvider)", False),
        ("name='edge 1'", True),
        ('name="edge 1" , memory_bytes>4e9', True),
        ("tag=canary, arch=aarch64 OR os=linux", True),  # AND binds tighter than OR
        ("tag=canary, (arch=aarch64 OR os=windows)", False),
        ("group=lab", True),
        ("group!=lab AND tag=canary", False),
        ("NOT NOT tag=canary", True),
        ("", True),
    ],
)
def test_selectors_with_or_in_and_not(text: str, matches: bool) -> None:
    parsed = parse_selector(text)
    assert parsed.matches(DEV) is matches
    assert parse_selector(str(parsed)).matches(DEV) is matches  # str() writes a selector that parses the same


@pytest.mark.parametrize(
    ("text", "column", "detail"),
    [
        ("tag=canary OR", 14, "expected a term"),
        ("tag=a AND (arch=b", 18, "expected ')'"),
        ("tag=a arch=b", 7, "expected AND, OR"),
        ("arch IN (a, b", 14, "expected ',' or ')'"),
        ("arch IN ()", 10, "expected a value"),
        ("arch NOT = x", 10, "expected IN after NOT"),
        ("colour=red", 1, "unknown key 'colour'"),
        ("tag=a, memory_bytes >= lots", 24, ">= needs a number"),
        ("tag=a OR tag>3", 13, "tag takes = or != only"),
        ("name='edge", 6, "an unclosed quote"),
        ("tag=a OR !tag=b", 10, "'!' cannot start a term"),
        ("(" * 40 + "tag=a" + ")" * 40, 33, "nested deeper than 32"),
    ],
)
def test_selector_errors_name_the_column(text: str, column: int, detail: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    assert info.value.column == column and detail in info.value.detail
    assert f"column {column}: " in str(info.value) and "\n" not in str(info.value)


def test_selector_waves_come_first_and_percentages_are_of_the_rest() -> None:
    ids = [f"d{i}" for i in range(10)]
    canary = {"d3", "d7"}
    specs = parse_waves("tag=canary,arch=x86_64,50%,100%")
    assert [str(w) for w in specs] == ["tag=canary,arch=x86_64", "50%", "100%"]
    waves = plan_waves(ids, specs, "ro-1", lambda _sel, d: d in canary)
    assert waves[0] == sorted(canary) and [len(w) for w in waves] == [2, 4, 4]
    assert plan_waves(ids, specs, "ro-1", lambda _s, d: d in canary) == waves  # deterministic
    # Selector waves alone: the rest follows in one last wave; a selector wave of nobody is dropped.
    assert [len(w) for w in plan_waves(ids, parse_waves(["tag=canary"]), "x", lambda _s, d: d in canary)] == [2, 8]
    assert [len(w) for w in plan_waves(ids, parse_waves(["tag=none", "1", "100%"]), "x", lambda _s, _d: False)] == [
        1,
        9,
    ]
    # Each item of a list is its own wave: two selector waves.
    two = parse_waves(["tag=canary", "tag=beta", "100%"])
    assert [w.selector for w in two] == ["tag=canary", "tag=beta", None]
    plan = RolloutPlan(waves=["tag=canary", "25%", "100%"], selector="arch=x86_64")
    assert plan.selectors() == ["arch=x86_64", "tag=canary"]


class _Dev:
    def __init__(self, id: str, tags: list[str], name: str = "") -> None:
        self.id, self.tags, self.name, self.inventory = id, tags, name, {"arch": "x86_64"}


def test_a_device_in_two_assigned_groups_follows_the_higher_priority() -> None:
    devices = [_Dev("a", ["kiosk"]), _Dev("b", ["kiosk", "beta"]), _Dev("c", [])]
    groups = [
        GroupDef("kiosks", "tag=kiosk", None, 0, True),
        GroupDef("beta", None, ("b", "c"), 5, True),
        GroupDef("zeta", "arch=x86_64", None, 0, True),  # same priority as kiosks: the name decides
        GroupDef("idle", "tag=kiosk", None, 99, False),  # not assigned: owns nobody
    ]
    m = Membership(groups, devices)
    assert m.members("kiosks") == ["a", "b"] and m.members("beta") == ["b", "c"] and m.members("idle") == ["a", "b"]
    assert {d: m.owner(d) for d in "abc"} == {"a": "kiosks", "b": "beta", "c": "beta"}
    assert m.owned("kiosks") == ["a"] and m.owned("zeta") == [] and m.owned("idle") == []
    assert parse_selector("group=beta AND NOT group=kiosks").matches(m.facts("c"))


# --- the store ----------------------------------------------------------------------------------------------


def test_reconcile_gives_joiners_a_follow_up_and_halts_after_a_cancel(store: Store) -> None:
    pid = _package(store)
    a = _enroll(store, name="a")
    store.update_device_tags(a, add=["kiosk"])
    store.create_group("kiosks", selector="tag=kiosk")
    _group, first, desired = store.assign_group("kiosks", RolloutPlan(waves=["100%"]), package_id=pid)
    assert first is not None and [d.device_id for d in desired] == [a]
    assert store.reconcile_groups() == []  # nobody new
    b = _enroll(store, name="b")
    store.update_device_tags(b, add=["kiosk"])
    assert store.reconcile_groups() == []  # the first rollout still runs: b waits for it
    store.control_rollout(first.id, "cancel")
    assert store.reconcile_groups() == []  # it was cancelled: the assignment halts
    halted = store.get_group("kiosks")["assignment"]["halted"]
    assert f"rollout {first.id} ended cancelled" in halted
    # Assigning again (a new assignment) gives both devices the package.
    _group, again, desired = store.assign_group("kiosks", RolloutPlan(waves=["100%"]), package_id=pid)
    assert again is not None and sorted(d.device_id for d in desired) == sorted([a, b])
    # A lower-priority group owns only the devices no other assigned group has; a joiner gets a follow-up.
    store.create_group("all-x86", selector="arch=x86_64", priority=-1)
    _g, everyone, desired = store.assign_group("all-x86", RolloutPlan(waves=["100%"]), package_id=pid)
    assert everyone is None and desired == []  # a and b follow kiosks (higher priority)
    c = _enroll(store, name="c")
    (follow,) = store.reconcile_groups()
    assert follow.device_id == c and follow.package_id == pid
    assert store.reconcile_groups() == []  # given once
    assert store.get_group("all-x86")["assignment"]["following"] == [c]


def test_group_refusals(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _enroll(store, name="a")
    with pytest.raises(InvalidRequest, match="column 1: a group's selector cannot refer to groups"):
        store.create_group("g", selector="group=x")
    with pytest.raises(InvalidRequest, match="must be 1-64 letters"):
        store.create_group("bad name", selector="tag=x")
    with pytest.raises(InvalidRequest, match="1 to 10000 devices"):
        store.create_group("g", devices=[])
    store.create_group("g", devices=[a])
    with pytest.raises(Conflict, match="exists"):
        store.create_group("g", selector="tag=x")
    with pytest.raises(NotFound, match=r"unknown group 'h' \(groups: g\)"):
        store.get_group("h")
    with pytest.raises(InvalidRequest, match="column 7: unknown group 'nope'"):
        store.create_rollout(_package(store), "all", RolloutPlan(waves=["100%"], selector="tag=x,group=nope"))
    store.create_group("h", selector="tag=y")
    store.assign_group("h", RolloutPlan(waves=["group=g", "100%"]), package_id=_package(store))
    with pytest.raises(Conflict, match="group 'h''s assignment selects waves by group 'g'; unassign it first"):
        store.delete_group("g")
    store.unassign_group("h")
    store.delete_group("h")
    monkeypatch.setattr(targeting, "MAX_GROUPS", 1)
    with pytest.raises(Conflict, match="has 1 groups, the most it keeps"):
        store.create_group("g2", selector="tag=x")
    store.delete_group("g")
    assert store.list_groups() == []


def test_a_device_whose_inventory_changes_moves_to_the_group_it_now_matches(store: Store) -> None:
    v1, v2 = _package(store), _package(store, "d" * 64)
    a = _enroll(store, name="a")  # reports arch x86_64 and no memory at enrollment
    store.create_group("x86", selector="arch=x86_64")
    store.create_group("big", selector="memory_bytes>=8e9", priority=5)
    _g, first, desired = store.assign_group("x86", RolloutPlan(waves=["100%"]), package_id=v1)
    assert first is not None and [(d.device_id, d.package_id) for d in desired] == [(a, v1)]
    _g, none, _d = store.assign_group("big", RolloutPlan(waves=["100%"]), package_id=v2)
    assert none is None  # nobody has 8 GB yet

    def report(memory: float) -> None:
        inventory = {"arch": "x86_64", "memory_bytes": memory}
        store.apply_reported(ReportedUpdate(a, 1, "COMMITTED", v1, v1, "1.0.0", "a", "", 0, 0, inventory))

    report(16e9)  # more memory: a joins "big", which outranks "x86", and gets its package
    (moved,) = store.reconcile_groups()
    assert (moved.device_id, moved.package_id, moved.generation) == (a, v2, 2)
    assert store.get_group("x86")["assignment"]["following"] == []
    report(1e9)  # leaves "big": keeps what it has (x86 gave it its release already)
    assert store.reconcile_groups() == [] and store.get_device(a).desired_package_id == v2


def test_the_driver_looks_for_joiners_when_woken_or_every_interval(store: Store) -> None:
    pid = _package(store)
    store.create_group("x86", selector="arch=x86_64")
    store.assign_group("x86", RolloutPlan(waves=["100%"]), package_id=pid)
    published: list[Any] = []
    driver = RolloutDriver(store, published.extend, holder="fleet-t", lease_ttl_s=30, targeting_s=3600)
    assert driver.step() == 0  # the first step looks (nobody yet)
    a = _enroll(store, name="a")
    assert driver.step() == 0 and published == []  # not woken, the interval not over: not yet
    driver.wake(targeting=True)
    assert driver.step() == 1 and [(r.device_id, r.package_id) for r in published] == [(a, pid)]
    driver.targeting_s = 0.0  # every step looks: nothing more is owed
    assert driver.step() == 0 and len(published) == 1


def test_a_device_that_could_run_no_variant_gets_it_once_it_can(store: Store) -> None:
    big = "e" * 64
    store.add_package(
        NewPackage(big, "m", "2.0.0", "model", "cpu-int4", "key", b"s", [("m", "f" * 64, 1)], min_memory_bytes=8 << 30)
    )
    a, b = _enroll(store, name="a"), _enroll(store, name="b")

    def report(device: str, memory: int, generation: int = 0, state: str = "IDLE") -> None:
        inventory = {"arch": "x86_64", "memory_bytes": memory}
        store.apply_reported(ReportedUpdate(device, generation, state, big, big, "2.0.0", "a", "", 0, 0, inventory))

    report(a, 16 << 30)
    store.create_group("x86", selector="arch=x86_64")
    _g, first, desired = store.assign_group("x86", RolloutPlan(waves=["100%"]), package_id=big)
    assert first is not None and [d.device_id for d in desired] == [a]
    assert {t.device_id: t.state for t in first.devices} == {a: "PENDING", b: "NO_VARIANT"}
    report(a, 16 << 30, generation=desired[0].generation, state="COMMITTED")
    assert store.get_rollout(first.id).state == "succeeded"
    assert store.reconcile_groups() == []  # b still cannot run it: no rollout, tried again later
    assert len(store.list_rollouts()) == 1
    report(b, 16 << 30)  # b got more memory
    (given,) = store.reconcile_groups()
    assert given.device_id == b and given.package_id == big


def test_stored_selectors_of_the_old_syntax_are_rewritten_by_the_migration(tmp_path: Path) -> None:
    """0006 quotes the values the selector language would not read bare ('name=edge 1')."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from slmops_fleet.store.database import MIGRATIONS_DIR, utcnow

    store = Store(f"sqlite:///{tmp_path}/old.db")
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0005")
        pid, now = "c" * 64, utcnow().isoformat()
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO packages (id, name, version, profile, kind, signed_manifest, signed_by, size_bytes, "
                    "created_at) VALUES (:p, 'm', '1.0.0', '', 'model', x'00', '', 0, :now)"
                ),
                {"p": pid, "now": now},
            )
            for rid, selector in [("ro-a", "name=edge 1, tag=canary"), ("ro-b", "tag=canary,memory_bytes>=2e9")]:
                plan = json.dumps({"waves": ["100%"], "selector": selector})
                conn.execute(
                    text(
                        "INSERT INTO rollouts (id, package_id, target, state, created_at, updated_at, transitions, "
                        "plan) VALUES (:id, :p, '\"all\"', 'succeeded', :now, :now, '[]', :plan)"
                    ),
                    {"id": rid, "p": pid, "now": now, "plan": plan},
                )
        store.migrate()
        a, b = store.get_rollout("ro-a"), store.get_rollout("ro-b")
        assert a.plan["selector"] == "name='edge 1',tag=canary" and b.plan["selector"] == "tag=canary,memory_bytes>=2e9"
        assert parse_selector(a.plan["selector"]).matches(DeviceFacts("d", "edge 1", ["canary"]))
    finally:
        store.close()
