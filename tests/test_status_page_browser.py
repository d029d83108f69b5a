"""The status page in a real browser: headless Chromium (Debian's `chromium` package) renders
the page served with real data, and the screenshot is kept as a test artefact
(test-artifacts/status-page.png). Without Chromium the test fails under CI (`$CI` set) and
is skipped elsewhere."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, insert

from etl.client import GreenApiClient
from etl.db import ROOT
from etl.models import SyncRun
from etl.simulator import Fault, Simulator
from etl.sync import Syncer, register_instances, utcnow
from etl.web import StatusServer
from tests.conftest import make_instance

ARTIFACT = ROOT / "test-artifacts" / "status-page.png"
LABELS = ["Sales desk", "Support line", "<script>alert(1)</script> & Co", "Warehouse", "Night"]
WIDTH, HEIGHT = 1280, 900


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = (
        "headless Chromium is needed for the status page test: "
        "apt-get install -y chromium (Debian's package; .ci/run installs it)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def browser(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return cast(tuple[int, int], struct.unpack(">II", data[16:24]))


def history(engine: Engine, ids: list[int]) -> None:
    """A day of runs every ten minutes per instance, with a bad hour and a slow evening."""
    t = cast(Table, SyncRun.__table__)
    rng = random.Random(5)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for k in range(1, 24 * 6):
        started = now - timedelta(minutes=10 * k)
        for iid in ids:
            bad_hour = 30 <= k < 36
            status = rng.choices(["ok", "anomaly", "failed"], [80, 5, 60 if bad_hour else 5])[0]
            ms = 4000 if status == "failed" else int(rng.gauss(250 + (150 if k > 100 else 0), 40))
            rows.append(
                {
                    "instance_id": iid,
                    "started_at": started,
                    "finished_at": started + timedelta(milliseconds=ms),
                    "status": status,
                    "error_kind": None if status == "ok" else "timeout",
                    "attempts": 1,
                    "duration_ms": ms,
                }
            )
    with engine.begin() as conn:
        conn.execute(insert(t), rows)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_status_page_in_headless_chromium(
    engine: Engine, fast_client: GreenApiClient, tmp_path: Path
) -> None:
    chromium()  # fail or skip before doing any work
    with Simulator(instances=len(LABELS), chats=25, seed=9) as sim:
        fleet = [
            make_instance(sim, iid, label=label)
            for iid, label in zip(sim.instance_ids, LABELS, strict=True)
        ]
        register_instances(engine, fleet)
        history(engine, sim.instance_ids)
        sim.set_fault(sim.instance_ids[1], Fault(status=401))
        sim.set_fault(sim.instance_ids[4], Fault(mode="empty"))
        syncer = Syncer(engine, fast_client)
        for inst in fleet:
            syncer.sync(inst)

    shot = tmp_path / "status-page.png"
    with StatusServer(engine, port=0) as server:
        rendered = browser(
            "--dump-dom",
            f"--screenshot={shot}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--hide-scrollbars",
            f"{server.url}/",
            profile=tmp_path / "profile",
        )

    # the browser built the page we meant: every row, the chart, and no script element
    dom = rendered.stdout
    assert dom.count("<tr class=") == len(LABELS), (dom[:2000], rendered.stderr[-2000:])
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in dom
    assert "<script" not in dom.lower()
    assert "<svg" in dom and 'class="bar failed"' in dom

    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert shot.exists(), rendered.stderr[-2000:]
    data = shot.read_bytes()
    assert png_size(data) == (WIDTH, HEIGHT)
    assert len(data) > 30_000, "a blank or nearly blank screenshot"
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
