"""Error classes that say whose fault a problem is."""


class TestbedError(Exception):
    """Base of every error testbed raises on purpose."""


class ConfigError(TestbedError):
    """The user's input is wrong (profile, image, option); the message says how to fix it."""


class InfraError(TestbedError):
    """The lab failed (QEMU died, serial vanished, relay silent); not the device's fault."""


class DutError(TestbedError):
    """The device under test misbehaved: a real failure."""
