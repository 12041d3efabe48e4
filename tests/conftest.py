import os
import sys

# the stage files live at the repository root, as in nanoGPT; tests import them from there
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
