"""Background jobs: the media job runner (one job at a time)."""
