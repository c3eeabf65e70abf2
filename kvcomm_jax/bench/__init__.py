"""Measurement: the TTFT benchmark, KV fidelity, tables, JSON and plots."""
