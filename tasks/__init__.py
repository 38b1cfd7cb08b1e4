"""Prefect 3 tasks: each wraps one DVC stage or one vaeft library call."""

from vaeft import runtime_env

runtime_env.configure()
