"""`slmops fleet keys ...`: the trusted package-signing keys and the statements that rotate them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    call,
    fail,
    new_table,
    out_console,
    print_json,
)

app = typer.Typer(help="Package-signing keys: list them, rotate them with signed statements.", no_args_is_help=True)


@app.command("list")
def keys_list(
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the trusted and retired signing keys and the key statements applied."""
    result = call(fleet, token, data_dir, lambda c: c.signing_keys())
    if as_json:
        print_json(result)
        return
    _show(result)


@app.command("apply")
def keys_apply(
    statement: Annotated[Path, typer.Argument(help="A statement 'slmops builder key-statement' wrote.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a signed key statement and pass it to every device.

    The fleet checks it (signed by a key it trusts now, a sequence above the last one), then trusts
    and retires keys as it says; devices offline now get it when they reconnect."""
    try:
        data = statement.read_bytes()
    except OSError as exc:
        fail(f"cannot read {statement}: {exc.strerror or exc}")
    result = call(fleet, token, data_dir, lambda c: c.apply_key_statement(data))
    if as_json:
        print_json(result)
        return
    out_console().print(f"key statement {result['applied']} applied (signed by {result['signed_by']})")
    _show(result)


def _show(result: dict[str, Any]) -> None:
    table = new_table(f"signing keys (last statement: {result['sequence']})", "key id", "state", "key")
    for k in result["trusted"]:
        table.add_row(k["key_id"], "trusted", k["key"])
    for k in result["retired"]:
        table.add_row(k["key_id"], "retired", k["key"])
    out_console().print(table)
    statements = result.get("statements") or []
    if statements:
        st = new_table("key statements", "sequence", "add", "retire", "signed by", "note")
        for s in statements:
            st.add_row(
                str(s["sequence"]), ", ".join(s["add"]), ", ".join(s["retire"]), ", ".join(s["signed_by"]), s["note"]
            )
        out_console().print(st)
