"""The kernel side: the sockets and rules that bring packets to ipqd.

  queue_socket   the netlink socket that moves nfnetlink_queue bytes
                 (QueueSocket; its Transport and Interfaces)
  multi_receive  a burst of datagrams in one recvmmsg
  hooks          the iptables/nft rules that queue traffic to ipqd, and the
                 lock that lets one instance own them
"""
