"""Sharing lab hardware between runs: locks on boards (``lock``)."""
