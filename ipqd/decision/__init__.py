"""The decision: a packet in, a verdict out, with no I/O.

  packet         the packet view rules match against (parse never raises)
  compiler       rules compiled into a first-match matcher
  engine         decide: packet in, verdict out, counters; fallback_verdict
  token_bucket   a Rate as a token bucket (rule rates, the log rate)
  rate_table     a rule's rate kept per key (source, network, port), bounded
  verdict_cache  verdicts kept per flow, read from the message in place
  checksum       checksums of rewritten packets
  conntrack      the ct_state conntrack gives each packet of a capture (explain)
"""
