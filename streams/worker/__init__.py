"""The worker: the agent, the hot path (engine, batch processing), its state and
store, its metrics."""
