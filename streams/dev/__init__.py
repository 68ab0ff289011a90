"""Development tooling, not run by a deployment: the local broker, the demo, the
benchmark, worker processes for tests."""
