"""Several instances on one database: `instances` (each `pipeline serve` and its last
heartbeat) and `schedule_slots` (the last interval of each poll or cron job some instance
fired)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "instances",
        sa.Column("owner", sa.String(160), primary_key=True),
        sa.Column("url", sa.String(255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "schedule_slots",
        sa.Column("name", sa.String(160), primary_key=True),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(160), nullable=False),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("schedule_slots")
    op.drop_table("instances")
