"""Health documents and the medical profile (issue 12): ``document`` (a name, date, category,
visibility and a reference to a blob and MIME part, never a copy) and ``profile_entry``

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'document',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('doc_date', sa.Date(), nullable=False),
        sa.Column('category', sa.String(length=12), nullable=False),
        sa.Column('visibility', sa.String(length=10), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('media', sa.String(length=60), nullable=False),
        sa.Column('blob_id', sa.Integer(), nullable=False),
        sa.Column('part', sa.String(length=200), nullable=True),
        sa.Column('source_message_id', sa.Integer(), nullable=True),
        sa.Column('added_by', sa.String(length=200), nullable=False),
        sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['patient_id'], ['patient.id'],
                                name='fk_document_patient_id_patient', ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['blob_id'], ['blob.id'], name='fk_document_blob_id_blob'),
        sa.PrimaryKeyConstraint('id', name='pk_document'),
    )
    op.create_index('ix_document_patient_category_date', 'document',
                    ['patient_id', 'category', 'doc_date'], unique=False)
    op.create_index('ix_document_blob_id', 'document', ['blob_id'], unique=False)
    op.create_table(
        'profile_entry',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('section', sa.String(length=20), nullable=False),
        sa.Column('label', sa.String(length=200), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('entry_date', sa.Date(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['patient_id'], ['patient.id'],
                                name='fk_profile_entry_patient_id_patient', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_profile_entry'),
    )
    op.create_index('ix_profile_entry_patient_id', 'profile_entry', ['patient_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_profile_entry_patient_id', table_name='profile_entry')
    op.drop_table('profile_entry')
    op.drop_index('ix_document_blob_id', table_name='document')
    op.drop_index('ix_document_patient_category_date', table_name='document')
    op.drop_table('document')
