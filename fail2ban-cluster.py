#!/usr/bin/env python3
"""fail2ban-cluster, the cluster console: see `fail2ban-cluster.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from f2bzmq.console import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
