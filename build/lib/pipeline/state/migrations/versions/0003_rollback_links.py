"""Rollback links: the release a rollback restored (`releases.restores`) and the head commit of
the service's repo when a pin was made (`pins.head`), so a different head releases it."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("releases", sa.Column("restores", sa.Integer(), nullable=True))
    op.add_column("pins", sa.Column("head", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("pins", "head")
    op.drop_column("releases", "restores")
