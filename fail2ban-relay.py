#!/usr/bin/env python3
"""fail2ban-relay: see `fail2ban-relay.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from f2bzmq.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("relay"))
