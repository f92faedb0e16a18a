"""testbed on a labgrid farm: places held through leases, health checks, farm nights.

``coordinator``: a labgrid client session for synchronous code. ``keeper``/``lease``: a
run's hold on a place (released however the run ends; expired when its heartbeat stops).
``health``: known-good smoke runs that take sick places out of service. ``run``: a job
matrix with retries and a summary. ``virtual``: a whole farm on this machine (a real
coordinator and exporter on loopback, boards on QEMU). ``cli``: ``python -m testbed farm``.
"""

import os

# gRPC's fork handlers, when a session's threads are busy, leave a forked child with broken
# epoll descriptors: the child (an exporter, QEMU, a helper started while a session is open)
# may crash before it execs. testbed forks only to exec, so the handlers are off, set before
# anything in this package imports labgrid (and with it gRPC).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
