"""Read models over ledger.events: the history index, the balance projection, reading the log."""
