"""The wire: netlink and nfnetlink_queue messages as bytes, with no I/O.

  nfnetlink    netlink and nfnetlink framing (headers, attributes, errors)
  nfqueue      nfnetlink_queue messages: config, packet, verdict, batch;
               QueueProtocol, the sans-IO side of a queue socket
  fast_decode  the packet message read in place (checked against nfqueue)
"""
