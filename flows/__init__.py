"""Prefect 3 flows over the vaeft pipeline (thin wrappers; the work is in ``vaeft``)."""

from vaeft import runtime_env

runtime_env.configure()
