"""kvcomm-jax command line. ``python run.py --help`` lists the commands; no arguments runs the main job."""

import sys

from kvcomm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
