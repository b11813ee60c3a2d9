"""Prometheus text metrics, kept in process (each uvicorn worker counts its own requests).

No client library: three counters and one histogram are a few lines, and the labels are
bounded (route templates, not raw paths; reason codes from a fixed table).
"""

from __future__ import annotations

import threading
from collections import Counter

PREFIX = "paymaster_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESERVE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, int]] = Counter()
        self._denials: Counter[str] = Counter()
        self._unauthorized: Counter[str] = Counter()
        self._reserve_buckets = [0] * len(RESERVE_BUCKETS)
        self._reserve_count = 0
        self._reserve_sum = 0.0

    def observe_request(self, route: str, method: str, status: int, code: str | None) -> None:
        with self._lock:
            self._requests[(route, method, status)] += 1
            if code is not None and status >= 400:
                self._denials[code] += 1
                # 401s are not in the audit log (unauthenticated traffic must not grow the
                # chain), so this is the only place they are counted.
                if status == 401:
                    self._unauthorized[code] += 1

    def observe_reserve(self, seconds: float) -> None:
        with self._lock:
            self._reserve_count += 1
            self._reserve_sum += seconds
            for i, bound in enumerate(RESERVE_BUCKETS):
                if seconds <= bound:
                    self._reserve_buckets[i] += 1

    def render(self) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
            denials = sorted(self._denials.items())
            unauthorized = sorted(self._unauthorized.items())
            buckets = list(self._reserve_buckets)
            count, total = self._reserve_count, self._reserve_sum
        lines = [
            f"# HELP {PREFIX}http_requests_total HTTP requests by route template, method and status.",
            f"# TYPE {PREFIX}http_requests_total counter",
        ]
        lines += [
            f'{PREFIX}http_requests_total{{route="{_label(r)}",method="{m}",status="{s}"}} {n}'
            for (r, m, s), n in requests
        ]
        lines += [
            f"# HELP {PREFIX}denials_total Error responses by reason code.",
            f"# TYPE {PREFIX}denials_total counter",
        ]
        lines += [f'{PREFIX}denials_total{{code="{_label(c)}"}} {n}' for c, n in denials]
        lines += [
            f"# HELP {PREFIX}unauthorized_total 401 responses by reason code (not in the audit log).",
            f"# TYPE {PREFIX}unauthorized_total counter",
        ]
        lines += [f'{PREFIX}unauthorized_total{{code="{_label(c)}"}} {n}' for c, n in unauthorized]
        lines += [
            f"# HELP {PREFIX}reserve_duration_seconds Time to decide a POST /v1/reservations.",
            f"# TYPE {PREFIX}reserve_duration_seconds histogram",
        ]
        lines += [
            f'{PREFIX}reserve_duration_seconds_bucket{{le="{bound}"}} {n}'
            for bound, n in zip(RESERVE_BUCKETS, buckets, strict=True)
        ]
        lines += [
            f'{PREFIX}reserve_duration_seconds_bucket{{le="+Inf"}} {count}',
            f"{PREFIX}reserve_duration_seconds_sum {total}",
            f"{PREFIX}reserve_duration_seconds_count {count}",
        ]
        return "\n".join(lines) + "\n"
