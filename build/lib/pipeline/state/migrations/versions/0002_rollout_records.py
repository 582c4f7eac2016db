"""Rollout records: per-host undo targets (`release_hosts`), the settings each release deployed
(`release_settings`), pins after a rollback (`pins`) and `releases.failure_kind`."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "pins",
        sa.Column("service", sa.String(length=128), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("service"),
    )
    op.create_table(
        "release_hosts",
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("previous_container", sa.String(length=80), nullable=True),
        sa.Column("previous_running", sa.Boolean(), nullable=True),
        sa.Column("previous_revision", sa.String(length=64), nullable=True),
        sa.Column("previous_digest", sa.String(length=160), nullable=True),
        sa.Column("new_container", sa.String(length=80), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
        ),
        sa.PrimaryKeyConstraint("release_id", "host"),
    )
    op.create_table(
        "release_settings",
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
        ),
        sa.PrimaryKeyConstraint("release_id"),
    )
    op.add_column("releases", sa.Column("failure_kind", sa.String(length=16), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("releases", "failure_kind")
    op.drop_table("release_settings")
    op.drop_table("release_hosts")
    op.drop_table("pins")
