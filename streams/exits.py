"""Exit statuses of ``ledger`` and of a worker, in one place (sysexits.h where one fits).

A supervisor can tell them apart: restart on UNAVAILABLE or INTERNAL; fix the settings
on NO_PERMISSION or CONFIG, where a restart does not help.
"""

from __future__ import annotations

REFUSED = 1  # the command ran and the answer is no: a rejection, an unknown account
USAGE = 2  # bad input on the command line, or the worker asked did not answer
TIMEOUT = 3  # submitted, and no outcome came in time
UNAVAILABLE = 69  # EX_UNAVAILABLE: no Kafka broker answered
INTERNAL = 70  # EX_SOFTWARE: one of the worker's services failed
NO_PERMISSION = 77  # EX_NOPERM: the broker refused the login or the TLS handshake
CONFIG = 78  # EX_CONFIG: settings unsafe outside development mode
