"""ipqd: a rule-driven packet firewall daemon for Linux NFQUEUE.

Packages and modules:
  ipqd.nfnetlink     pure netlink/nfnetlink encode and decode (no I/O)
  ipqd.nfqueue       pure nfnetlink_queue messages: config, packet, verdict
  ipqd.queue_socket  the socket that moves those bytes to and from the kernel
  ipqd.ipq           the libipq API on top of it
  ipqd.policy        the YAML policy language: model, loader, `ipqd check`
  ipqd.packet        the packet view rules match against (dpkt)
  ipqd.compiler      rules compiled into a fast first-match matcher
"""
__version__ = "0.1.0"
