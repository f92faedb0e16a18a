"""The lab around the devices: the farm's own network services (``network``) and locks on
shared boards (``lock``)."""
