"""Outbound sinks: where the gateway forwards what it accepted (InfluxDB v2 today)."""
