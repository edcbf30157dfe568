import os
import sys

# tests import lrc.py, train.py, convert.py, eval_tiny.py and data/ from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; LRC_TEST_CUDA_ON_CPU=1 dry-runs it on the CPU "
                                       "(tests/test_cuda.py)")
