"""Alembic environment: runs on the connection lmaas_server.metering.db.migrate hands over."""

from alembic import context

from lmaas_server.metering.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
