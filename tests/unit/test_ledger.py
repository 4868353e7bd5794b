"""The alias ledger's storage and rendering: pages stay under MLflow's 5000-character tag limit however long
the history grows, read back in order, the description fits, and "which version served at time T" has one
answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from pipeline import ledger
from pipeline.ledger import AliasMove, append, read, render, served_on

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def move(i: int, alias: str = "champion") -> AliasMove:
    return AliasMove(at=(T0 + timedelta(days=i)).isoformat(), alias=alias, version=str(i + 1),
                     replaced=str(i) if i else None, why="promotion", by=f"flywheel_nightly run scheduled__{i}",
                     evaluation=f"runs:/{i:032d}/evaluation/report.html", note="passed the gate: " + "x" * 200)


def test_pages_stay_under_the_tag_limit_and_read_back_in_order():
    tags: dict[str, str] = {}
    for i in range(300):
        tags |= append(tags, [move(i)])
    assert len([k for k in tags if k.startswith("flywheel.alias_history.")]) > 10
    assert max(len(v) for v in tags.values()) <= 4800
    assert all(isinstance(json.loads(v), list) for v in tags.values())
    assert [m.version for m in read(tags)] == [str(i + 1) for i in range(300)]


def test_description_fits_and_newest_first():
    moves = [move(i) for i in range(300)]
    text = render("m", moves, {"champion": "300", "previous": "299"})
    assert len(text) <= 5000 and "older moves" in text
    assert text.index("| champion | v300 |") < text.index("| champion | v299 |")
    assert "`champion` → v300" in text


def test_which_version_served_at_a_time():
    moves = [move(0), move(1, "previous"), move(2)]
    assert served_on(moves, T0 + timedelta(days=1, hours=3)).version == "1"
    assert served_on(moves, T0 + timedelta(days=2, hours=1)).version == "3"
    assert served_on(moves, T0 - timedelta(days=1)) is None


def test_an_alias_moved_outside_flywheel_is_named_not_lost():
    moves = [AliasMove(at="2026-01-01T00:00:00+00:00", alias="champion", version="1", why="bootstrap", by="a"),
             AliasMove(at="2026-01-02T00:00:00+00:00", alias="challenger", version="2", why="nomination", by="a")]
    live = {"champion": "3", "previous": None, "challenger": "2"}  # someone set champion -> v3 in the MLflow UI
    found = ledger.unrecorded(moves, live, "2026-01-03T00:00:00+00:00")
    assert [(m.alias, m.version, m.replaced, m.why) for m in found] == [
        ("champion", "3", "1", "moved outside Flywheel")]
    assert "registry says v3" in found[0].note and "said v1" in found[0].note
    assert ledger.unrecorded(moves, {"champion": "1", "challenger": "2", "previous": None}, "x") == []
