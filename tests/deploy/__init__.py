"""Tests of the deployment files: Prometheus, alert rules, Grafana."""
