"""testbed: a pytest plugin that boots embedded Linux OS images on QEMU or real boards and certifies them."""

__version__ = "0.1.0"
