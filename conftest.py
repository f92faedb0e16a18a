"""Repository-level pytest configuration: the testbed plugin comes in through its pytest11 entry point."""
