import os
import sys

# tests import lrc.py, train.py, convert.py, eval_tiny.py and data/ from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
