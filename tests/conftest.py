import os
import sys

# Tests import shared helpers as `tests.toy`; make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
