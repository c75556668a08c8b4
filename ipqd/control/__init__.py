"""The control socket: ask the running daemon, and change it (docs/control.md).

    codec.py     the protocol as bytes: requests, answers, error codes (pure)
    commands.py  the command table and one request's dispatch (pure)
    server.py    the daemon's Unix socket, served from the supervisor's loop
    client.py    one request and its answer, for the `ipqd` command
    set_verbs.py `ipqd set`: change and list the running daemon's dynamic sets
"""
