"""Repositories: all SQL, one module per aggregate. They flush, never commit; the transaction
is opened at the edges (`core.db.transaction`)."""
