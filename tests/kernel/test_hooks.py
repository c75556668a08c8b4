"""Hook rules: the planned text (pure), and install/remove in a namespace (real kernel)."""
import os
import socket
import sys
import textwrap

import pytest

from ipqd.kernel import hooks
from ipqd.policy.model import Hook, Offload, QueueConfig
from ipqd.kernel.queue_socket import QueueSocket

IPQD = os.path.join(os.path.dirname(sys.executable), "ipqd")


def script_text(plan, tool):
    return "".join(stdin for argv, stdin in plan.scripts if argv[0] == tool)


def test_plan_single_queue_with_bypass():
    plan = hooks.plan([Hook("input", "ipv4"), Hook("output", "both", "icmp")],
                      QueueConfig(nums=(3,), bypass=True, offload=Offload("off")),
                      "iptables-legacy")
    assert script_text(plan, "iptables-legacy-restore") == textwrap.dedent("""\
        *filter
        :IPQD_INPUT - [0:0]
        :IPQD_OUTPUT - [0:0]
        -A IPQD_INPUT -j NFQUEUE --queue-num 3 --queue-bypass
        -A IPQD_OUTPUT -p icmp -j NFQUEUE --queue-num 3 --queue-bypass
        COMMIT
        """)
    # ICMP for IPv6 is ipv6-icmp; the ipv4-only input hook has no IPv6 rule.
    assert script_text(plan, "ip6tables-legacy-restore") == textwrap.dedent("""\
        *filter
        :IPQD_OUTPUT - [0:0]
        -A IPQD_OUTPUT -p ipv6-icmp -j NFQUEUE --queue-num 3 --queue-bypass
        COMMIT
        """)
    assert plan.jumps == (("iptables-legacy", "filter", "INPUT", "IPQD_INPUT"),
                          ("iptables-legacy", "filter", "OUTPUT", "IPQD_OUTPUT"),
                          ("ip6tables-legacy", "filter", "OUTPUT", "IPQD_OUTPUT"))


def test_plan_balance_and_routing_hooks_in_mangle():
    plan = hooks.plan([Hook("prerouting", "ipv6")],
                      QueueConfig(nums=(0, 1, 2, 3), bypass=False, offload=Offload("off")),
                      "iptables-nft")
    assert script_text(plan, "ip6tables-nft-restore") == (
        "*mangle\n:IPQD_PREROUTING - [0:0]\n"
        "-A IPQD_PREROUTING -j NFQUEUE --queue-balance 0:3\nCOMMIT\n")


def test_conntrack_states_get_queues_of_their_own():
    queue = QueueConfig(nums=(4, 5), conntrack=True)
    layout = hooks.queue_layout(queue)
    assert layout[4] == (0, "new") and layout[5] == (1, "new")
    assert layout[6] == (0, "established") and layout[13] == (1, "untracked")
    assert len(layout) == 10
    plan = hooks.plan([Hook("input", "ipv4")], queue, "iptables-legacy")
    text = script_text(plan, "iptables-legacy-restore")
    assert "-m conntrack --ctstate ESTABLISHED -j NFQUEUE --queue-balance 6:7 --queue-bypass" in text
    nft = script_text(hooks.plan([Hook("input", "ipv4")], queue, "nft"), "nft")
    assert "meta nfproto ipv4 ct state related queue num 8-9 bypass" in nft


def test_layout_without_conntrack_is_the_policy_numbers():
    assert hooks.queue_layout(QueueConfig(nums=(0, 1))) == {0: (0, None), 1: (1, None)}


# ---------------------------------------------------------------- real kernel

POLICY = """\
version: 1
queue: {num: 7, bypass: %s}
hooks:
  - {chain: input, family: both, proto: udp}
default: {action: accept}
rules: []
"""


def ipqd_in(host, *args, tmp_path):
    return host.sh(f"{IPQD} hooks {' '.join(args)} --state-dir {tmp_path}/state", check=False)


def saved(host, variant):
    return host.sh(f"iptables-{variant}-save; ip6tables-{variant}-save").stdout


@pytest.mark.kernel
@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_install_queues_traffic_and_remove_leaves_nothing(lab, tmp_path, variant):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "false")
    server = lab.server
    server.sh(f"iptables-{variant} -w -A INPUT -p tcp --dport 1 -j ACCEPT")     # the admin's own
    before = saved(server, variant)
    backend = f"iptables-{variant}"
    result = ipqd_in(server, "install", f"--policy {policy}", f"--backend {backend}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    again = ipqd_in(server, "install", f"--policy {policy}", tmp_path=tmp_path)     # remembered backend
    assert again.returncode == 0, again.stderr
    rules = saved(server, variant)
    assert rules.count("-A INPUT -j IPQD_INPUT") == 2                 # one jump per family, once
    assert "-A IPQD_INPUT -p udp -j NFQUEUE --queue-num 7" in rules
    assert "--dport 1 -j ACCEPT" in rules

    # Traffic really goes to queue 7, and nowhere else.
    with QueueSocket(sock=server.netlink_socket()) as qs:
        qs.bind(7)
        tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.sendto(b"hooked", (lab.SERVER4, 5555))
        (packet,) = qs.receive(timeout=2)
        assert packet.queue == 7 and packet.payload.endswith(b"hooked")
        qs.verdict(packet, 1)

    result = ipqd_in(server, "remove", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    assert saved(server, variant).replace(" ", "") == before.replace(" ", "") or \
        "IPQD" not in saved(server, variant)
    assert "IPQD" not in saved(server, variant)
    assert "--dport 1 -j ACCEPT" in saved(server, variant)


@pytest.mark.kernel
def test_bypass_flag_lets_traffic_through_without_a_listener(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 5555))
    rx.settimeout(0.5)
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for bypass, arrives in (("false", False), ("true", True)):
        policy.write_text(POLICY % bypass)
        result = ipqd_in(lab.server, "install", f"--policy {policy}", "--backend iptables-legacy",
                         tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        tx.sendto(bypass.encode(), (lab.SERVER4, 5555))
        try:
            got = rx.recv(10)
        except socket.timeout:
            got = None
        assert (got == bypass.encode()) is arrives


@pytest.mark.kernel
def test_nft_backend_says_what_is_missing(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "true")
    result = ipqd_in(lab.server, "install", f"--policy {policy}", "--backend nft", tmp_path=tmp_path)
    if result.returncode != 0:
        assert "the nft backend cannot queue packets" in result.stderr
        assert "CONFIG_NFT_QUEUE" in result.stderr
        assert "try --backend iptables-nft or --backend iptables-legacy" in result.stderr
        detect = lab.server.sh(f"{IPQD} hooks detect").stdout
        assert detect.strip().endswith("iptables-nft")
        assert "passed over nft: the nft backend cannot queue packets" in detect
        assert "\ncgroup: this kernel has cgroup v2" in detect     # /sys is the netns's own
        assert "CONFIG_NFT_QUEUE" in detect
    else:      # a kernel with CONFIG_NFT_QUEUE: the table is there, and goes away
        assert "queue num 7 bypass" in lab.server.sh("nft list table inet ipqd").stdout
        assert ipqd_in(lab.server, "remove", tmp_path=tmp_path).returncode == 0
        assert lab.server.sh("nft list table inet ipqd", check=False).returncode != 0


@pytest.mark.kernel
def test_changed_hooks_remove_chains_no_longer_wanted(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("chain: input", "chain: output") % "true")
    assert ipqd_in(lab.server, "install", f"--policy {policy}", "--backend iptables-legacy",
                   tmp_path=tmp_path).returncode == 0
    policy.write_text(POLICY % "true")
    assert ipqd_in(lab.server, "install", f"--policy {policy}", tmp_path=tmp_path).returncode == 0
    rules = saved(lab.server, "legacy")
    assert "IPQD_OUTPUT" not in rules and "IPQD_INPUT" in rules
    assert ipqd_in(lab.server, "remove", tmp_path=tmp_path).returncode == 0


# ---------------------------------------------------------------- looking changes nothing

def ruleset(host) -> str:
    """Everything both backends hold, for both families, without counters;
    and which legacy tables the kernel has registered."""
    text = host.sh("nft list ruleset; iptables-legacy-save; ip6tables-legacy-save; "
                   "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null; "
                   "true").stdout
    return "\n".join(line.split(" [")[0] for line in text.splitlines()
                     if not line.startswith("#"))


@pytest.mark.kernel
def test_show_detect_check_and_remove_without_state_change_nothing(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "true")
    os.chmod(policy, 0o644)
    server = lab.server
    before = ruleset(server)
    for args in (["detect"], ["show", f"--policy {policy}"],
                 ["show", f"--policy {policy}", "--backend iptables-legacy"], ["remove"]):
        result = ipqd_in(server, *args, tmp_path=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert ruleset(server) == before, args
    assert server.sh(f"{IPQD} check {policy}").returncode == 0
    assert ruleset(server) == before
    assert "ipqd_probe" not in server.sh("nft list tables").stdout


@pytest.mark.kernel
def test_install_then_remove_leaves_the_ruleset_as_it_was(lab, tmp_path):
    """iptables-nft: the filter tables the install had to create are
    deleted again once empty."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "true")
    os.chmod(policy, 0o644)
    server = lab.server
    before = ruleset(server)
    assert ipqd_in(server, "install", f"--policy {policy}", "--backend iptables-nft",
                   tmp_path=tmp_path).returncode == 0
    assert "IPQD_INPUT" in ruleset(server)
    result = ipqd_in(server, "remove", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ruleset(server) == before


@pytest.mark.kernel
def test_a_policy_leaving_ipv6_takes_its_ipv6_chains_along(lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    both = (POLICY % "true").replace("proto: udp}", "proto: udp}") + ""
    text = both.replace("queue: {num: 7, bypass: true}",
                        "queue: {num: 7, bypass: true, offload: {mask: '0xff000000'}}")
    policy.write_text(text)
    os.chmod(policy, 0o644)
    server = lab.server
    assert ipqd_in(server, "install", f"--policy {policy}", "--backend iptables-nft",
                   tmp_path=tmp_path).returncode == 0
    assert "IPQD" in server.sh("ip6tables-nft-save").stdout
    policy.write_text(text.replace("family: both", "family: ipv4"))
    assert ipqd_in(server, "install", f"--policy {policy}", tmp_path=tmp_path).returncode == 0
    assert "IPQD" not in server.sh("ip6tables-nft-save").stdout
    assert "IPQD_INPUT" in server.sh("iptables-nft-save").stdout


def test_looking_and_changing_need_root(tmp_path):
    """Without CAP_NET_ADMIN the commands say so (exit 4), instead of
    naming a wrong backend."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "true")
    os.chmod(policy, 0o644)
    import subprocess
    for args in (["detect"], ["remove"], ["install", "--policy", str(policy)]):
        result = subprocess.run(
            ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--", IPQD, "hooks",
             *args, "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 4, (args, result.stdout, result.stderr)
        assert "needs root (CAP_NET_ADMIN)" in result.stderr, result.stderr
