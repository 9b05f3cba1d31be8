"""The job store in SQL: connections, migrations, every state move, the ledger, leases."""
