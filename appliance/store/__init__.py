"""The store: object files written atomically, their SQLite index, and ingest, the one door in."""
