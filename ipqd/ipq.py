"""The libipq API's public name: `from ipqd import ipq`, as libipq
programs port over (examples/passer.py). It is ipqd.tools.ipq itself."""
import sys

from ipqd.tools import ipq as _ipq

sys.modules[__name__] = _ipq
