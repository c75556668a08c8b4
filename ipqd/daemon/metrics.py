"""The daemon's figures (ipqd.daemon.control.snapshot) as Prometheus text or
OpenMetrics, written by prometheus_client's own exposition code: one
collector that turns a snapshot into metric families (docs/control.md
lists them).

Per-queue figures are per worker: a worker answers its slot's queues (a
queue of `queue.num`, and its conntrack siblings when rules read
ct_state), so `queue` is the slot's lowest queue number.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest as prometheus_text
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_text

FORMATS = ("prometheus", "openmetrics")


class _Snapshot:
    """A prometheus_client collector over one snapshot."""

    def __init__(self, figures: dict):
        self.figures = figures

    def collect(self) -> Iterator:
        f = self.figures
        slot_queue = {str(w["slot"]): str(min(w["queues"])) if w["queues"] else str(w["slot"])
                      for w in f["workers"]}

        packets = CounterMetricFamily("ipqd_packets", "Packets ipqd gave a verdict, by verdict "
                                      "and queue (the cache's answers included)",
                                      labels=["queue", "verdict"])
        offloaded = CounterMetricFamily("ipqd_packets_offloaded", "Flows whose verdict was "
                                        "handed to the kernel's offload rules",
                                        labels=["queue"])
        malformed = CounterMetricFamily("ipqd_packets_malformed", "Packets that could not be "
                                        "parsed (given the default verdict)", labels=["queue"])
        cache = CounterMetricFamily("ipqd_cache_lookups", "Verdict cache lookups by result",
                                    labels=["queue", "result"])
        logs = CounterMetricFamily("ipqd_log_decisions", "Decisions to log, by what became of "
                                   "them (suppressed: over logging.rate)",
                                   labels=["queue", "outcome"])
        for slot, stats in sorted(f["per_worker"].items()):
            queue = slot_queue.get(slot, slot)
            packets.add_metric([queue, "accept"], stats.get("accepted", 0))
            packets.add_metric([queue, "drop"], stats.get("dropped", 0))
            offloaded.add_metric([queue], stats.get("offloaded", 0))
            malformed.add_metric([queue], stats.get("malformed", 0))
            cache.add_metric([queue, "hit"], stats.get("cache_hits", 0))
            cache.add_metric([queue, "miss"], stats.get("cache_misses", 0))
            for outcome in ("logged", "suppressed", "overflowed", "failed"):
                logs.add_metric([queue, outcome], stats.get(f"log_{outcome}", 0))
        yield from (packets, offloaded, malformed, cache, logs)

        rules = CounterMetricFamily("ipqd_rule_packets", "Packets decided by each rule "
                                    "(`default`: by no rule), by verdict",
                                    labels=["rule", "verdict"])
        sizes = CounterMetricFamily("ipqd_rule_bytes", "Bytes of the packets each rule "
                                    "decided (on the wire; flows the kernel holds after an "
                                    "offload are not in it: `ipqd counters` adds them)",
                                    labels=["rule"])
        for name, entry in f["rules"].items():
            rules.add_metric([name, "accept"], entry["accepted"])
            rules.add_metric([name, "drop"], entry["dropped"])
            sizes.add_metric([name], entry.get("bytes", 0))
        yield rules
        yield sizes

        queued = GaugeMetricFamily("ipqd_kernel_queue_packets", "Packets in the kernel's queue "
                                   "now (unread or unanswered)", labels=["queue"])
        queue_dropped = CounterMetricFamily("ipqd_kernel_queue_dropped", "Packets the kernel "
                                            "dropped because the queue was full",
                                            labels=["queue"])
        user_dropped = CounterMetricFamily("ipqd_kernel_user_dropped", "Packets the kernel "
                                           "dropped because ipqd's socket buffer was full",
                                           labels=["queue"])
        for queue, k in sorted(f["kernel"].items()):
            queued.add_metric([queue], k["queued"])
            queue_dropped.add_metric([queue], k["queue_dropped"])
            user_dropped.add_metric([queue], k["user_dropped"])
        yield from (queued, queue_dropped, user_dropped)

        reloads = CounterMetricFamily("ipqd_reloads", "Reloads by result", labels=["result"])
        reloads.add_metric(["loaded"], f["reloads"]["loaded"])
        reloads.add_metric(["failed"], f["reloads"]["failed"])
        yield reloads

        sets = GaugeMetricFamily("ipqd_set_entries", "Entries in each set", labels=["set"])
        for name, size in sorted(f.get("sets", {}).items()):
            sets.add_metric([name], size)
        yield sets

        control = CounterMetricFamily("ipqd_control_refused", "Control requests refused or "
                                      "connections closed, by reason", labels=["reason"])
        for reason, count in sorted(f["control"].items()):
            if reason not in ("connections", "requests"):
                control.add_metric([reason], count)
        yield control

        yield GaugeMetricFamily("ipqd_policy_rules", "Rules in the running policy",
                                value=f["policy"]["rules"])
        yield GaugeMetricFamily("ipqd_policy_loaded_timestamp_seconds",
                                "When the running policy was loaded (Unix time)",
                                value=f["policy"]["loaded_at"])
        yield GaugeMetricFamily("ipqd_start_time_seconds", "When the daemon started (Unix time)",
                                value=f["started_at"])
        yield GaugeMetricFamily("ipqd_workers", "Worker processes", value=len(f["workers"]))


def exposition(figures: dict, kind: str = "prometheus") -> str:
    """`figures` (a snapshot) as text of `kind` (FORMATS)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(figures))
    write = openmetrics_text if kind == "openmetrics" else prometheus_text
    return write(registry).decode("utf-8")
