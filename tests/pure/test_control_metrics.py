"""A snapshot as Prometheus and OpenMetrics text (ipqd.daemon.metrics),
read back with prometheus_client's own parsers."""
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from ipqd.daemon.metrics import exposition

SNAPSHOT = {
    "policy": {"path": "/etc/ipqd/policy.yaml", "digest": "ab" * 32, "rules": 2,
               "loaded_at": 1796553135.5},
    "started_at": 1796553134.25,
    "workers": [{"slot": 0, "pid": 10, "queues": [4, 5, 6, 7, 8], "fresh": True},
                {"slot": 1, "pid": 11, "queues": [9], "fresh": False}],
    "per_worker": {"0": {"accepted": 7, "dropped": 2, "offloaded": 3, "malformed": 1,
                         "cache_hits": 5, "cache_misses": 4, "log_logged": 2,
                         "log_suppressed": 1},
                   "1": {"accepted": 1}},
    "rules": {"ssh": {"hits": 6, "accepted": 6, "dropped": 0, "bytes": 360},
              'we"ird\\name': {"hits": 1, "accepted": 0, "dropped": 1},
              "default": {"hits": 3, "accepted": 2, "dropped": 1}},
    "kernel": {"4": {"queued": 1, "queue_dropped": 2, "user_dropped": 3, "portid": 10}},
    "reloads": {"loaded": 4, "failed": 1, "last": None},
    "sets": {"banned": 12},
    "control": {"connections": 9, "requests": 9, "too-slow": 2},
}


def samples(families):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families for s in family.samples}


def test_prometheus_text_reads_back():
    got = samples(text_string_to_metric_families(exposition(SNAPSHOT)))
    assert got[("ipqd_packets_total", (("queue", "4"), ("verdict", "accept")))] == 7
    assert got[("ipqd_packets_total", (("queue", "4"), ("verdict", "drop")))] == 2
    assert got[("ipqd_packets_total", (("queue", "9"), ("verdict", "accept")))] == 1
    assert got[("ipqd_packets_total", (("queue", "9"), ("verdict", "drop")))] == 0
    assert got[("ipqd_packets_offloaded_total", (("queue", "4"),))] == 3
    assert got[("ipqd_cache_lookups_total", (("queue", "4"), ("result", "hit")))] == 5
    assert got[("ipqd_log_decisions_total", (("outcome", "suppressed"), ("queue", "4")))] == 1
    assert got[("ipqd_rule_packets_total", (("rule", 'we"ird\\name'), ("verdict", "drop")))] == 1
    assert got[("ipqd_rule_packets_total", (("rule", "default"), ("verdict", "accept")))] == 2
    assert got[("ipqd_rule_bytes_total", (("rule", "ssh"),))] == 360
    assert got[("ipqd_kernel_queue_packets", (("queue", "4"),))] == 1
    assert got[("ipqd_kernel_queue_dropped_total", (("queue", "4"),))] == 2
    assert got[("ipqd_kernel_user_dropped_total", (("queue", "4"),))] == 3
    assert got[("ipqd_reloads_total", (("result", "failed"),))] == 1
    assert got[("ipqd_set_entries", (("set", "banned"),))] == 12
    assert got[("ipqd_control_refused_total", (("reason", "too-slow"),))] == 2
    assert ("ipqd_control_refused_total", (("reason", "requests"),)) not in got
    assert got[("ipqd_policy_loaded_timestamp_seconds", ())] == 1796553135.5
    assert got[("ipqd_workers", ())] == 2


def test_openmetrics_reads_back():
    text = exposition(SNAPSHOT, "openmetrics")
    assert text.endswith("# EOF\n")
    got = samples(om_families(text))
    assert got[("ipqd_packets_total", (("queue", "4"), ("verdict", "accept")))] == 7
    assert got[("ipqd_set_entries", (("set", "banned"),))] == 12
