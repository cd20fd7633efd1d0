"""The mailbox store: engine, schema and migrations, the group writer, blobs, and the
operations every edge calls."""
