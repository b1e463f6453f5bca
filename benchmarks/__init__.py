"""Benchmarks: the backend and the add-on against bare diffusers (`python -m benchmarks`, `make bench`).

Each scenario runs in a fresh process (benchmarks.bare, benchmarks.client, benchmarks.addon) and writes
raw timestamps; the measurement modules (overhead, speed, cold, footprint) turn them into the table and
the JSON in benchmarks/results/. See benchmarks/RESULTS.md. Stdlib only at import time.
"""
