"""The local broker's old import path, kept for scripts outside this repository
(``../shared/peers/compare.sh`` imports ``streams.kafka_local.free_port``).
The module is ``streams.dev.kafka_local``."""

from streams.dev.kafka_local import *  # noqa: F403
from streams.dev.kafka_local import free_port as free_port
