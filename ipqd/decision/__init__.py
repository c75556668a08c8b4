"""The decision: a packet in, a verdict out, with no I/O.

  packet         the packet view rules match against (parse never raises)
  compiler       rules compiled into a first-match matcher
  engine         decide: packet in, verdict out, counters; fallback_verdict
  token_bucket   a Rate as a token bucket (rule rates, the log rate)
  rate_table     a rule's rate kept per key (source, network, port), bounded
  verdict_cache  verdicts kept per flow, read from the message in place
  address_set    a dynamic set's entries, looked up per packet at any size
  checksum       checksums of rewritten packets
  conntrack      the ct_state conntrack gives each packet of a capture (explain)
  shadow         a candidate policy deciding beside the enforced one
  verify         a policy's test cases decided (test, check, the daemon's load)
  described      a packet description as bytes and meta (explain, test, diff)
"""
