"""Operator jobs: topics, ACLs, verify, rebuild, status."""
