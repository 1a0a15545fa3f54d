"""Helpers that test subprocesses import (the tests put this folder's parent on PYTHONPATH)."""
