"""`slmops demo` end to end on the real SmolLM2-135M-Instruct: the README's first command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.smollm2
@pytest.mark.timeout(900)
def test_demo_runs_the_whole_journey(tmp_path: Path, smollm2_hf_model: Path) -> None:
    workdir = tmp_path / "demo"
    # The demo imports SmolLM2 itself on a first run; here it reuses the session's import and the
    # builder's cache of converted steps, as a second run of the demo in the same workdir would.
    (workdir / "models").mkdir(parents=True)
    (workdir / "models" / "smollm2-hf").symlink_to(smollm2_hf_model)
    figures_path = tmp_path / "figures.json"
    env = {**os.environ, "SLMOPS_CACHE_DIR": str(Path(__file__).resolve().parents[2] / ".cache" / "builder")}
    proc = subprocess.run(
        [sys.executable, "-m", "slmops_cli", "demo", "--workdir", str(workdir), "--json", str(figures_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=880,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    v1, v2 = figures["v1"], figures["v2"]
    # Both agents answered, with the version rolled out, and the real model knows its capitals.
    for release, version in ((v1, "1.0.0"), (v2, "1.1.0")):
        assert len(release["answers"]) == 2
        for answer in release["answers"]:
            assert answer["version"] == version
            assert answer["tokens_per_s"] > 0
    assert any("Paris" in a["text"] for a in v1["answers"]), v1["answers"]
    # v1 moved the whole package once for both devices; v2 moved only the changed file.
    assert v1["package_bytes"] <= v1["mqtt_bytes_sent"] <= 1.2 * v1["package_bytes"]
    assert list(v2["files_sent"]) == ["genai_config.json"]
    assert v2["mqtt_bytes_sent"] < 10_000
    # It cleaned up after itself: no agent or fleet is left running.
    assert not (workdir / "fleet" / "fleet.json").exists()
    for agent in ("agent-1", "agent-2"):
        assert not (workdir / "agents" / agent / "agent.sock").exists()
