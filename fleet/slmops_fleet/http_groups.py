"""The HTTP API of named device groups and the releases assigned to them (continuous targeting):
/v1/groups. Like `http_api`, it translates HTTP to `FleetOperations` and the store, nothing more."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from slmops_fleet.operations import FleetOperations


class GroupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    selector: str | None = Field(
        None, max_length=1000, description='Dynamic group: "tag=kiosk AND arch IN (x86_64, aarch64)".'
    )
    devices: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=10_000, description="Static group: device ids."
    )
    priority: int = Field(0, ge=-1000, le=1000, description="A device in several assigned groups follows the highest.")


class AssignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package_id: str | None = Field(None, min_length=1, max_length=64)
    release: str | None = Field(None, min_length=1, max_length=330)
    waves: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(None, max_length=100)
    soak_s: float = Field(0.0, ge=0, le=30 * 86400)
    wave_timeout_s: float | None = Field(None, gt=0, le=30 * 86400)
    gates: dict[str, Any] | None = Field(None, description="As a rollout's gates.")


def add_group_routes(v1: APIRouter, service: FleetOperations) -> None:
    store = service.store

    @v1.post("/groups")
    def create_group(body: GroupRequest) -> dict[str, Any]:
        return store.create_group(body.name, selector=body.selector, devices=body.devices, priority=body.priority)

    @v1.get("/groups")
    def list_groups() -> dict[str, Any]:
        return {"groups": store.list_groups()}

    @v1.get("/groups/{name}")
    def get_group(name: str) -> dict[str, Any]:
        return store.get_group(name)

    @v1.delete("/groups/{name}")
    def delete_group(name: str) -> dict[str, Any]:
        store.delete_group(name)
        return {"deleted": name}

    @v1.post("/groups/{name}/assign")
    def assign_group(name: str, body: AssignRequest) -> dict[str, Any]:
        return service.assign_group(
            name,
            package_ref=body.package_id,
            release=body.release,
            waves=body.waves,
            soak_s=body.soak_s,
            wave_timeout_s=body.wave_timeout_s,
            gates=body.gates,
        )

    @v1.post("/groups/{name}/unassign")
    def unassign_group(name: str) -> dict[str, Any]:
        return store.unassign_group(name)
