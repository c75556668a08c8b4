"""Tools on top of the layers below.

  ipq      the libipq API (`from ipqd import ipq`)
  explain  `ipqd explain`: the verdict a policy gives to captured or described packets
  diff     `ipqd diff`: the regions two policies decide differently
  reach    `ipqd explain --reach`: a packet that reaches a rule
  policy_test  `ipqd test`: a policy's test cases, failures at their lines, JUnit
  pcap     pcap and pcapng captures, for explain
  grammar  explain's packet description, as text for --help and errors
"""
