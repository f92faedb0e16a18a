"""The lab around the devices: the farm's own network services (network.py)."""
