"""Failed-login counts shared by every serve process (the login throttle, policy/throttle.py)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'login_failure',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('first_at', sa.Float(), nullable=False),
        sa.Column('last_at', sa.Float(), nullable=False),
        sa.Column('expires_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('key', name='pk_login_failure'),
    )
    op.create_index('ix_login_failure_expires_at', 'login_failure', ['expires_at'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_login_failure_expires_at', table_name='login_failure')
    op.drop_table('login_failure')
