"""The alias ledger: every move of `champion`, `previous` and `challenger`, kept in the registry itself.

MLflow keeps no alias history, so "which model served on day D, and why" would otherwise have no answer once an
alias moved on. Each move is one `AliasMove`; the list lives as JSON pages in registered-model tags
(`flywheel.alias_history.NNNN`, each under MLflow's 5000-character tag limit, so the ledger grows without
bound) and is rendered as Markdown into the registered model's description. Pure: no MLflow calls here; the
registry appends inside the same alias lock that moves the alias.
"""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel

from pipeline.tags import ModelTag, Why

PAGE_CHARS = 4800  # MLflow stores registered-model tag values and descriptions in 5000-character columns
DESCRIPTION_CHARS = 4900


class AliasMove(BaseModel):
    at: str                      # ISO-8601 UTC
    alias: str                   # champion | previous | challenger
    version: str | None          # where the alias points now (None: cleared)
    replaced: str | None = None  # where it pointed before
    why: str                     # a `Why` value
    by: str                      # a user, or `dag_id run run_id`
    evaluation: str | None = None  # the evidence: an evaluation report URI or an online/canary verdict
    note: str = ""               # one sentence

    def sentence(self) -> str:
        target = f"v{self.version}" if self.version else "cleared"
        return f"{self.alias} → {target} ({self.why}) by {self.by}"


def page_key(i: int) -> str:
    return f"{ModelTag.HISTORY_PREFIX}{i:04d}"


def read(tags: dict[str, str]) -> list[AliasMove]:
    """The whole ledger, oldest first, from the registered model's tags."""
    keys = sorted(k for k in tags if k.startswith(ModelTag.HISTORY_PREFIX))
    return [AliasMove.model_validate(e) for k in keys for e in json.loads(tags[k])]


def append(tags: dict[str, str], moves: list[AliasMove]) -> dict[str, str]:
    """The tag writes that append `moves`: the last page grows until full, then a new page starts."""
    keys = sorted(k for k in tags if k.startswith(ModelTag.HISTORY_PREFIX))
    index = len(keys) - 1 if keys else 0
    page = json.loads(tags[keys[-1]]) if keys else []
    writes: dict[str, str] = {}
    for move in moves:
        entry = move.model_dump(exclude_defaults=True)
        entry["note"] = entry.get("note", "")[:1000]
        candidate = json.dumps([*page, entry], separators=(",", ":"))
        if len(candidate) > PAGE_CHARS and page:
            index, page = index + 1, []
            candidate = json.dumps([entry], separators=(",", ":"))
        page.append(entry)
        writes[page_key(index)] = candidate
    return writes


def unrecorded(moves: list[AliasMove], live: dict[str, str | None], at: str) -> list[AliasMove]:
    """Entries for aliases whose live target differs from the ledger's last word on them: moved in the MLflow
    UI, or by a process that died between its alias write and its ledger write. Recorded (or shown) as such,
    so the ledger never silently disagrees with the registry."""
    last: dict[str, str | None] = {}
    for m in moves:
        last[m.alias] = m.version
    return [AliasMove(at=at, alias=alias, version=version, replaced=last.get(alias), why=Why.UNRECORDED,
                      by="unknown", note=f"the registry says {'v' + version if version else 'cleared'}, the "
                      f"ledger's last entry said {'v' + last[alias] if last.get(alias) else 'nothing'}")
            for alias, version in live.items() if last.get(alias) != version]


def served_on(moves: list[AliasMove], at: datetime) -> AliasMove | None:
    """The champion move in force at `at`: which version served then, and why."""
    current = None
    for m in moves:
        if m.alias == "champion" and datetime.fromisoformat(m.at) <= at:
            current = m
    return current


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(name: str, moves: list[AliasMove], aliases: dict[str, str]) -> str:
    """The registered model's description: current aliases, then the newest moves that fit MLflow's limit."""
    now = ", ".join(f"`{a}` → v{v}" for a, v in sorted(aliases.items())) or "none"
    head = (f"# {name}\n\nManaged by Flywheel. Aliases now: {now}.\n\n"
            "`challenger` is a candidate that passed its gate and waits for evidence (canary) or a review; it is "
            "cleared when the version becomes champion, is rejected, times out, is retired or rolled back.\n\n"
            "## Alias history (newest first)\n\n| when (UTC) | alias | version | was | why | by | evidence |\n"
            "|---|---|---|---|---|---|---|\n")
    tail = "\nFull ledger: `flywheel history` (or `--json`), or the `flywheel.alias_history.*` tags."
    rows, size = [], len(head) + len(tail) + 40
    for m in reversed(moves):
        evidence = _cell((m.evaluation or m.note or "")[:160])
        row = (f"| {m.at[:19].replace('T', ' ')} | {m.alias} | {'v' + m.version if m.version else '—'} | "
               f"{'v' + m.replaced if m.replaced else '—'} | {m.why} | {_cell(m.by)} | {evidence} |\n")
        if size + len(row) > DESCRIPTION_CHARS:
            rows.append(f"| … | {len(moves) - len(rows)} older moves | | | | | |\n")
            break
        rows.append(row)
        size += len(row)
    return head + "".join(rows) + tail
