"""How large a policy may be, and how much work checking it may take.

A policy is read and checked on every start and reload, and compiled into
every worker, so its size bounds the time a reload takes and the memory each
worker keeps. Measured on two CPUs: 10,000 rules reload in about 3 s; 50,000
take about 3 s and 250 MB to check, then 3-9 s to compile and 150-250 MB in
each worker. The limits leave room for generated policies several times the
size of the benchmarked 10,000 rules; past them, sets say the same in fewer
rules. docs/policy.md lists them.
"""
from __future__ import annotations

# One file, and all the files of a policy together (the main file and its
# policy.d fragments). Reading 4 MiB of YAML takes about 300 MB while it lasts.
MAX_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024

# Rules in all files together.
MAX_RULES = 50_000

# A policy is at most about six levels deep (rules -> rule -> src -> list);
# the limit stops the composer's recursion long before Python's own limit.
MAX_DEPTH = 16

# Work of the search for shadowed rules: a group of earlier rules looked at,
# an index looked up or a rule compared each count one. Large generated
# policies need about three per rule; past the limit (about a second of work)
# the search stops with a warning that says so.
MAX_SHADOW_STEPS = 1_000_000

# The exact search for rules several earlier rules shadow together
# (ipqd.policy.regions): only for policies of at most this many rules, and
# each rule's search given up past this many cubes: at most about half a
# second for 200 rules that overlap much.
MAX_TOGETHER_RULES = 200
MAX_TOGETHER_CUBES = 10_000

# Problems a policy carries for the daemon's log and `ipqd explain`: past
# these, one more line counts the rest (`ipqd check` lists them all), so
# thousands of warnings cannot crowd reload and error lines out of the log.
MAX_LISTED_PROBLEMS = 100
