"""Identifiers: a prefix, then 12 hex digits of milliseconds and 20 of randomness (80 bits),
so ids sort by creation and no central id oracle is needed."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    return f"{prefix}{int(time.time() * 1000):012x}{os.urandom(10).hex()}"
