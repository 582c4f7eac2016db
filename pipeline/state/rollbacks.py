"""What a rollback needs from the database: the settings each release deployed, the release
history as plain rows, and pins (a service held on a release until a newer commit).

Settings hold env values: they are read back only to roll out again, never shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pipeline.config.model import ServiceSection, decode, to_data
from pipeline.plan.rollback import PastRelease, PinRecord
from pipeline.state.schema import Pin, Release, ReleaseSettings
from pipeline.timeutil import aware

log = structlog.get_logger(__name__)

_FORMAT = 1  # of the settings JSON; another format is read as "no settings"


@dataclass(frozen=True)
class ServiceSettings:
    """A service's settings as a release deployed them: its validated `[services.NAME]` table
    and the text of its env file (None without one). Holds env values: its repr hides them."""

    service: ServiceSection = field(repr=False)
    env_file_text: str | None = field(default=None, repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "service": to_data(self.service),
                "env_file_text": self.env_file_text,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings | None:
        """The settings stored as `text`, or None when they no longer validate (a config key
        renamed since): a rollback then keeps the current settings and says so."""
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT:
                return None
            return cls(decode(ServiceSection, data["service"]), data.get("env_file_text"))
        except msgspec.ValidationError as exc:
            # Only where it failed: the message may quote the (secret) input.
            where = str(exc).rpartition(" - at `$")[2].rstrip("`").lstrip(".")
            log.warning("stored release settings do not validate", keys=[where or "service"])
            return None
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("stored release settings are not readable JSON")
            return None


class Rollbacks:
    """Release settings, release rows and pins: `state.rollbacks` of a `State`, given its
    session factory and clock."""

    def __init__(
        self,
        session: Callable[[], AbstractContextManager[Session]],
        now: Callable[[], datetime],
    ) -> None:
        self.session = session
        self.now = now

    def release_settings(self, release_id: int) -> ServiceSettings | None:
        """The settings release `release_id` deployed; None for a release made before they were
        recorded (or whose settings no longer validate)."""
        with self.session() as s:
            row = s.get(ReleaseSettings, release_id)
            text = row.settings if row is not None else None
        return ServiceSettings.from_json(text) if text is not None else None

    def past_releases(self, service: str) -> list[PastRelease]:
        """Every release of `service` (superseded commits and notes left out), oldest first."""
        with self.session() as s:
            rows = s.scalars(
                select(Release)
                .where(Release.service == service, Release.status.not_in(("superseded", "note")))
                .order_by(Release.id)
            )
            return [
                PastRelease(
                    id=r.id,
                    kind=r.kind,
                    status=r.status,
                    revision=r.revision,
                    digest=r.digest,
                    ref=r.ref,
                    restores=r.restores,
                )
                for r in rows
            ]

    def pin_service(
        self, service: str, *, release_id: int, revision: str, head: str | None, reason: str
    ) -> None:
        """Hold `service` on `revision` (release `release_id`) until its repo's head is another
        commit than `head`, or it is unpinned; replaces an earlier pin."""
        with self.session() as s:
            row = s.get(Pin, service)
            if row is None:
                row = Pin(service=service)
                s.add(row)
            row.release_id, row.revision, row.head = release_id, revision, head
            row.reason, row.created_at = reason, self.now()

    def unpin_service(self, service: str) -> bool:
        """Let passes roll `service` out again; True when it was pinned."""
        with self.session() as s:
            result = s.execute(delete(Pin).where(Pin.service == service))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def pins(self) -> dict[str, PinRecord]:
        """Every pinned service and its pin."""
        with self.session() as s:
            return {
                p.service: PinRecord(
                    revision=p.revision,
                    release_id=p.release_id,
                    head=p.head,
                    reason=p.reason,
                    since=aware(p.created_at),
                )
                for p in s.scalars(select(Pin))
            }
