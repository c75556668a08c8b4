"""The decision: a packet in, a verdict out, with no I/O.

  packet         the packet view rules match against (parse never raises)
  compiler       rules compiled into a first-match matcher
  engine         judge: packet in, verdict out, counters
  verdict_cache  verdicts kept per flow, read from the message in place
  checksum       checksums of rewritten packets
"""
