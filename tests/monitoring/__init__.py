"""deploy/monitoring: the alert rules (promtool), the PrometheusRule, the Grafana dashboard."""
