"""The job store's Alembic migrations (``versions/``) and the views they create (``views``)."""

#: The newest revision in ``versions/``: a store at it needs no migration. Read without
#: loading Alembic (every command checks it); a test holds it to Alembic's own head.
HEAD = "0012"
