"""Development tools, never shipped in the image: ``make dev``'s supervisor (run.py), the
dev inbox that prints every message (sink.py) and the celery-exporter runner
(celery_exporter.sh)."""
