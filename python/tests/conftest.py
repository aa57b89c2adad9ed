"""pytest for the shim's pure parts: python/ on the import path."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
