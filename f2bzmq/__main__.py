"""`python3 -m f2bzmq ROLE …` runs a role; `python3 -m f2bzmq demo` runs the local demo cluster."""

import sys

from .cli import umbrella_main

if __name__ == "__main__":
    sys.exit(umbrella_main(sys.argv[1:]))
