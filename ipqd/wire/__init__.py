"""The wire: netlink and nfnetlink_queue messages as bytes, with no I/O.

  nfnetlink    netlink and nfnetlink framing (headers, attributes, errors)
  attributes   the packet message's attributes, declared once: every
               reader and writer of a packet message is derived from it
  nfqueue      nfnetlink_queue messages: config, packet, verdict, batch;
               QueueProtocol, the sans-IO side of a queue socket
  fast_decode  the packet message read in place (checked against nfqueue)
"""
