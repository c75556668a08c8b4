"""ipqd: a rule-driven packet firewall daemon for Linux NFQUEUE.

The pure core (bytes and values in, values out; no I/O):
  ipqd.nfnetlink     netlink/nfnetlink framing
  ipqd.nfqueue       nfnetlink_queue messages: config, packet, verdict, batch
  ipqd.policy        the YAML policy: model, loader, `ipqd check`
  ipqd.packet        the packet view rules match against
  ipqd.compiler      rules compiled into a first-match matcher
  ipqd.engine        packet in, verdict out
  ipqd.checksum      checksums of rewritten packets
  ipqd.printable     text escaped for one line of a log or a terminal

The I/O around it:
  ipqd.queue_socket  the netlink socket that moves nfnetlink_queue bytes
  ipqd.ipq           the libipq API on top of it
  ipqd.hooks         the iptables/nft rules that queue traffic to ipqd
  ipqd.worker        one process answering the packets of its queues
  ipqd.daemon        `ipqd run`: supervisor, signals, systemd
  ipqd.decision_log  decisions and events to journald or stderr
  ipqd.pcap          capture files, for `ipqd explain` (ipqd.explain)
  ipqd.cli           the `ipqd` command
"""
__version__ = "0.1.0"
