"""`python -I -S -B .../launcher CONFIG`: the launcher, in a bare interpreter (see run.py)."""

import importlib
import os
import sys

# This directory is sys.path[0]: import the package as `launcher` from its parent.
sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))
importlib.import_module("launcher.run").main(sys.argv[1])
