"""Transports: pyzmq bridged into Trio."""
