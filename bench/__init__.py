"""
A benchmark of exoproxy against a direct connection and nginx, on loopback.

`python -m bench.run` runs the whole comparison, and `bench/README.md` lists what it
needs.
"""
