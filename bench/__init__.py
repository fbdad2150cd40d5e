"""regcache's benchmark suite (issue 4): ``python -m bench`` or ``bench/run.sh``.

Not a test package: nothing here is collected by pytest (testpaths = tests, no test_*.py).
"""
