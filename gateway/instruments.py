"""The gateway's Prometheus instruments (counters, gauges, histograms), on a registry owned by one
application instance. Called instruments, not metrics: "metrics" are the devices' values.

No module-level collectors: tests run several gateways in one process, and each must count
only its own traffic. Components receive the `Instruments` object they report to.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.wear import WrittenBytesCollector


class Instruments:
    """Every counter, gauge and histogram the gateway exports at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_in = Counter(
            "cgw_messages_received", "MQTT/driver messages received", ["channel"], registry=r
        )
        self.messages_rejected = Counter(
            "cgw_messages_rejected", "Messages refused and dead-lettered", ["reason"], registry=r
        )
        self.readings = Counter("cgw_readings", "Telemetry readings accepted", registry=r)
        self.events = Counter("cgw_events", "Device and rule events", ["severity"], registry=r)
        self.presence_changes = Counter("cgw_presence_changes", "Presence changes", ["state"], registry=r)
        self.devices = Gauge("cgw_devices", "Known devices by presence", ["state"], registry=r)
        self.queue_depth = Gauge("cgw_queue_depth", "Batches waiting between stages", ["stage"], registry=r)
        self.store_writes = Counter(
            "cgw_store_rows_written", "Rows written to the local store", ["table"], registry=r
        )
        self.store_write_seconds = Histogram(
            "cgw_store_write_seconds", "Time to write one batch to the local store", registry=r
        )
        self.sink_points = Counter(
            "cgw_sink_points", "Points handled by a sink", ["sink", "outcome"], registry=r
        )
        self.sink_write_seconds = Histogram(
            "cgw_sink_write_seconds", "Time to write one batch to a sink", ["sink"], registry=r
        )
        self.sink_buffered = Gauge(
            "cgw_sink_buffered_points", "Points waiting to be written", ["sink"], registry=r
        )
        self.sink_up = Gauge("cgw_sink_up", "1 while the sink's last write succeeded", ["sink"], registry=r)
        self.outbox_bytes = Gauge("cgw_outbox_bytes", "Size of the durable outbox", registry=r)
        self.outbox_pending = Gauge(
            "cgw_outbox_pending_points",
            "Points in the outbox not yet accepted by a sink",
            ["sink"],
            registry=r,
        )
        self.outbox_age = Gauge(
            "cgw_outbox_oldest_seconds",
            "Age of the oldest row a sink has not delivered yet (0 when it is up to date)",
            ["sink"],
            registry=r,
        )
        self.outbox_dropped = Counter(
            "cgw_outbox_dropped_points", "Telemetry points dropped because the outbox was full", registry=r
        )
        self.dead_letters_trimmed = Counter(
            "cgw_dead_letters_trimmed",
            "Oldest dead letters deleted to keep the table within store.dead_letter_max_bytes",
            registry=r,
        )
        self.driver_connected = Gauge(
            "cgw_driver_connected", "1 while a driver is connected", ["driver"], registry=r
        )
        self.driver_errors = Counter(
            "cgw_driver_errors",
            "Driver errors (unreachable peers, refused reads)",
            ["driver", "reason"],
            registry=r,
        )
        self.service_requests = Counter(
            "cgw_service_requests",
            "Service requests filed, by source and outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.ratings = Counter("cgw_service_ratings", "Resident ratings received", ["score"], registry=r)
        self.service_alarms = Counter(
            "cgw_service_alarms", "Overdue and stalled service requests raised", ["type"], registry=r
        )
        self.uplink_commands = Counter(
            "cgw_uplink_commands",
            "District commands received over the uplink, by action and outcome",
            ["action", "outcome"],
            registry=r,
        )
        r.register(WrittenBytesCollector())
        self.stream_dropped = Counter(
            "cgw_stream_dropped", "Live-stream events dropped for slow subscribers", registry=r
        )
