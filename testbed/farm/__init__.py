"""testbed on a labgrid farm: places held through leases, health checks, farm nights.

``coordinator``: a labgrid client session for synchronous code. ``keeper``/``lease``: a
run's hold on a place (released however the run ends; expired when its heartbeat stops).
``health``: known-good smoke runs that take sick places out of service. ``run``: a job
matrix with retries and a summary. ``virtual``: a whole farm on this machine (a real
coordinator and exporter on loopback, boards on QEMU). ``cli``: ``python -m testbed farm``.
"""

# gRPC settings for labgrid sessions: testbed/__init__.py (set before any gRPC import).
