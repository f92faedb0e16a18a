"""testbed: a pytest plugin that boots embedded Linux OS images on QEMU or real boards and certifies them."""

__version__ = "0.1.0"

import os as _os

# gRPC's fork handlers, when a labgrid session's threads are busy, leave a forked child with
# broken epoll descriptors: the child (an exporter, QEMU, a helper started while a session is
# open) may crash before it execs. testbed forks only to exec, so the handlers are off; set here,
# before anything of testbed's can import labgrid (and with it gRPC), whatever the import order.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
