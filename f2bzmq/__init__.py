"""f2bzmq: ZeroMQ clustering for fail2ban."""

__version__ = "0.1.0"
