"""ipqd: a rule-driven packet firewall daemon for Linux NFQUEUE.

The pure core (bytes and values in, values out; no I/O):
  ipqd.wire.nfnetlink     netlink/nfnetlink framing
  ipqd.wire.attributes    the packet message's attributes, declared once
  ipqd.wire.nfqueue       nfnetlink_queue messages: config, packet, verdict, batch
  ipqd.policy        the YAML policy: model, loader, `ipqd check`
  ipqd.decision.packet        the packet view rules match against
  ipqd.decision.compiler      rules compiled into a first-match matcher
  ipqd.decision.engine        packet in, verdict out
  ipqd.decision.checksum      checksums of rewritten packets
  ipqd.printable     text escaped for one line of a log or a terminal

The I/O around it:
  ipqd.kernel.queue_socket  the netlink socket that moves nfnetlink_queue bytes
  ipqd.tools.ipq           the libipq API on top of it
  ipqd.kernel.hooks         the iptables/nft rules that queue traffic to ipqd
  ipqd.worker        one process answering the packets of its queues
  ipqd.daemon        `ipqd run`: supervisor, signals, systemd
  ipqd.daemon.decision_log  decisions and events to journald or stderr
  ipqd.tools.pcap          capture files, for `ipqd explain` (ipqd.tools.explain)
  ipqd.cli           the `ipqd` command
"""
__version__ = "0.1.0"
