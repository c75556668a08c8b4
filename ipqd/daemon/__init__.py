"""`ipqd run`: the supervisor and its child processes.

  supervisor   the daemon's life cycle, signals, reload, systemd (Daemon)
  pool         the workers by slot, their sockets, restarts with backoff
  handover     a reload's hand-over as a state machine, without processes
  messages     the declared messages between the processes, and their order
  loading      loading a policy in a short-lived process, with a time limit
  child        starting a child interpreter (isolated) and its Channel
  worker       one worker: a queue socket answering every packet
  notify       systemd's notification socket and watchdog
  sets         the dynamic sets: their entries on disk, told to every worker
"""
from ipqd.daemon.loading import LoadedPolicy, load_in_child
from ipqd.daemon.pool import WorkerHandle
from ipqd.daemon.supervisor import Daemon, run_daemon
from ipqd.errors import StartupError

__all__ = ["Daemon", "LoadedPolicy", "StartupError", "WorkerHandle", "load_in_child",
           "run_daemon"]
