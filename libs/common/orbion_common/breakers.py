"""Circuit breakers for calls to the outside world (OpenAI, WhatsApp, Google Sheets).

:class:`Breaker` keeps aiobreaker's ``CircuitBreaker`` as the state holder (its states,
storage and listeners) but makes the admission and accounting decisions itself, because
aiobreaker 1.2 has known limits that would hurt us:

- it opens on *consecutive* failures only: we also open when the failure ratio over the
  last ``window`` calls reaches ``failure_ratio`` (a flapping dependency opens too);
- in half-open it lets every concurrent call through: we admit one trial at a time and
  fast-fail the rest until the trial settles;
- ``timeout_duration`` must be a ``timedelta``: we build it from seconds;
- its open-time arithmetic mixes ``utcnow()`` and ``now()`` (a wrong ``time_remaining``
  unless TZ=UTC): we never read it; open time is kept on ``time.monotonic``;
- its Redis storage is synchronous and would block the event loop: only memory storage
  is used (each replica has its own breakers, which is what a breaker should measure);
- slow calls: a call over ``call_timeout`` is cancelled and counted as a failure.

Metrics (default Prometheus registry): state gauge, transitions, failures, fast-fails,
calls by outcome. State changes are also handed to ``on_change`` so a service can record
them as ``BreakerStateChanged`` events. ``state`` / :meth:`Breaker.info` feed ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any, Final, TypeVar

from aiobreaker import CircuitBreaker, CircuitBreakerState
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

_STATE_NAMES: Final = {
    CircuitBreakerState.CLOSED: CLOSED,
    CircuitBreakerState.OPEN: OPEN,
    CircuitBreakerState.HALF_OPEN: HALF_OPEN,
}
_STATE_VALUES: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

BREAKER_STATE = Gauge(
    "orbion_breaker_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)", ["breaker"]
)
BREAKER_TRANSITIONS = Counter(
    "orbion_breaker_transitions_total",
    "Circuit breaker state transitions",
    ["breaker", "from_state", "to_state"],
)
BREAKER_FAILURES = Counter(
    "orbion_breaker_failures_total", "Calls through a breaker that failed (errors and timeouts)", ["breaker"]
)
BREAKER_FAST_FAILS = Counter(
    "orbion_breaker_fast_fails_total", "Calls refused at once because the breaker was open", ["breaker"]
)
BREAKER_CALLS = Counter(
    "orbion_breaker_calls_total", "Calls through a breaker by outcome", ["breaker", "outcome"]
)

#: ``on_change(breaker_name, from_state, to_state, reason)``; called synchronously, must not block.
StateListener = Callable[[str, str, str, str], None]


class BreakerOpen(Exception):
    """The breaker refused the call without trying it (open, or a half-open trial is running)."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; retry in {retry_after:.1f}s")
        self.name = name
        #: Seconds until the breaker will admit a trial call (0 when a trial is in flight).
        self.retry_after = retry_after


class CallTimeout(TimeoutError):
    """The call took longer than the breaker's ``call_timeout``; counted as a failure."""


class Breaker:
    """One dependency's circuit breaker. Async calls only: ``await breaker.call(fn, *args)``.

    ``exclude``: exception types (or predicates) that are the caller's fault (a 4xx) and must
    not count as a dependency failure; they count as a success for the breaker.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        call_timeout: float | None = 10.0,
        window: int = 20,
        failure_ratio: float = 0.5,
        min_calls: int = 10,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]] = (),
        on_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.reset_timeout = reset_timeout
        self.call_timeout = call_timeout
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self._clock = clock
        self._on_change = on_change
        self._exclude = tuple(exclude)
        # aiobreaker holds the state (memory storage only, see module docstring); we drive it.
        self._cb = CircuitBreaker(
            fail_max=fail_max, timeout_duration=timedelta(seconds=reset_timeout), name=name
        )
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._last_error = ""
        self._last_success_at: float | None = None
        self._last_failure_at: float | None = None
        self.fast_fails = 0
        self.failures = 0
        self._m_failures = BREAKER_FAILURES.labels(name)
        self._m_fast_fails = BREAKER_FAST_FAILS.labels(name)
        self._m_ok = BREAKER_CALLS.labels(name, "success")
        self._m_err = BREAKER_CALLS.labels(name, "failure")
        self._m_state = BREAKER_STATE.labels(name)
        self._m_state.set(0)

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open breaker whose reset timeout elapsed
        still reads ``open`` until a call tries it)."""
        return _STATE_NAMES[self._cb.current_state]

    @property
    def fail_max(self) -> int:
        return int(self._cb.fail_max)

    @property
    def consecutive_failures(self) -> int:
        return int(self._cb.fail_counter)

    def retry_after(self) -> float:
        """Seconds until an open breaker admits a trial call; 0 when closed or due."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - self._clock())

    def info(self) -> dict[str, object]:
        """JSON-able state for ``/readyz`` info (an open breaker never makes a service unready)."""
        now = self._clock()
        return {
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "failures": self.failures,
            "fast_fails": self.fast_fails,
            "retry_after_s": round(self.retry_after(), 3),
            "last_error": self._last_error,
            "last_success_s_ago": None
            if self._last_success_at is None
            else round(now - self._last_success_at, 3),
        }

    def _transition(self, to: str, reason: str) -> None:
        frm = self.state
        if frm == to:
            return
        if to == OPEN:
            self._opened_at = self._clock()
            self._cb._state_storage.state = CircuitBreakerState.OPEN
        elif to == HALF_OPEN:
            self._cb._state_storage.state = CircuitBreakerState.HALF_OPEN
        else:
            self._cb._state_storage.state = CircuitBreakerState.CLOSED
            self._cb._state_storage.reset_counter()
            self._outcomes.clear()
        self._m_state.set(_STATE_VALUES[to])
        BREAKER_TRANSITIONS.labels(self.name, frm, to).inc()
        level = logging.WARNING if to == OPEN else logging.INFO
        log.log(level, "breaker %s: %s -> %s (%s)", self.name, frm, to, reason)
        if self._on_change is not None:
            try:
                self._on_change(self.name, frm, to, reason)
            except Exception:  # a listener bug must never break the guarded call
                log.exception("breaker %s: state listener failed", self.name)

    # -- manual control (operators, tests) -------------------------------------------------

    def force_open(self, reason: str = "forced") -> None:
        self._transition(OPEN, reason)

    def reset(self, reason: str = "reset") -> None:
        self._trial_in_flight = False
        self._transition(CLOSED, reason)

    # -- calls -----------------------------------------------------------------------------

    def _is_excluded(self, exc: BaseException) -> bool:
        for ex in self._exclude:
            if isinstance(ex, type):
                if isinstance(exc, ex):
                    return True
            elif ex(exc):
                return True
        return False

    def _admit(self) -> bool:
        """Decide before a call; returns True when this call is the half-open trial."""
        state = self._cb.current_state
        if state is CircuitBreakerState.CLOSED:
            return False
        if state is CircuitBreakerState.OPEN:
            remaining = self._opened_at + self.reset_timeout - self._clock()
            if remaining > 0:
                self._fast_fail(remaining)
            self._transition(HALF_OPEN, "reset timeout elapsed")
        # Half-open: exactly one trial at a time, the rest fast-fail.
        if self._trial_in_flight:
            self._fast_fail(0.0)
        self._trial_in_flight = True
        return True

    def _fast_fail(self, retry_after: float) -> None:
        self.fast_fails += 1
        self._m_fast_fails.inc()
        raise BreakerOpen(self.name, retry_after)

    def _record_success(self, trial: bool) -> None:
        self._last_success_at = self._clock()
        self._m_ok.inc()
        if trial:
            self._trial_in_flight = False
            self._transition(CLOSED, "trial call succeeded")
            return
        self._cb._state_storage.reset_counter()
        self._outcomes.append(False)

    def _record_failure(self, trial: bool, exc: BaseException) -> None:
        self._last_failure_at = self._clock()
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        self.failures += 1
        self._m_failures.inc()
        self._m_err.inc()
        if trial:
            self._trial_in_flight = False
            self._transition(OPEN, f"trial call failed: {self._last_error}")
            return
        if self.state != CLOSED:
            return  # a call admitted before the breaker opened; already open
        self._cb._state_storage.increment_counter()
        self._outcomes.append(True)
        if self.consecutive_failures >= self.fail_max:
            self._transition(OPEN, f"{self.consecutive_failures} consecutive failures: {self._last_error}")
            return
        n = len(self._outcomes)
        if n >= self.min_calls and sum(self._outcomes) / n >= self.failure_ratio:
            self._transition(OPEN, f"failure ratio {sum(self._outcomes)}/{n}: {self._last_error}")

    async def call(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await func(*args, **kwargs)`` through the breaker.

        Raises :class:`BreakerOpen` without calling when open, :class:`CallTimeout` when the
        call exceeds ``call_timeout``, or the call's own exception.
        """
        trial = self._admit()
        try:
            if self.call_timeout is None:
                result = await func(*args, **kwargs)
            else:
                try:
                    async with asyncio.timeout(self.call_timeout):
                        result = await func(*args, **kwargs)
                except TimeoutError as exc:
                    raise CallTimeout(f"{self.name}: call exceeded {self.call_timeout}s") from exc
        except asyncio.CancelledError:
            # Our caller was cancelled (shutdown): says nothing about the dependency.
            if trial:
                self._trial_in_flight = False
            raise
        except Exception as exc:
            if self._is_excluded(exc):
                self._record_success(trial)
            else:
                self._record_failure(trial, exc)
            raise
        self._record_success(trial)
        return result
