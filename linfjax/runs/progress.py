"""Progress a person can watch: bars that count finished work, and an estimate for the whole run.

JAX dispatches work asynchronously: a loop returns from `step(...)` long before the device
has finished it, so a bar counting dispatched steps races ahead and its estimate swings.
A `Bar` here is handed each step's output (`bar.update(result=metrics)`) and advances only
when that output is ready, blocking on the outputs every few steps (never on every step,
which would stall the device between steps).

A `Tracker` follows a whole run, or a whole grid: it holds an estimate of each stage's work
(`plan`), draws an outer bar over it whose remaining time is the whole pipeline's, and makes
the stage bars (`bar`), whose finished work moves the outer bar. A stage only says how many
steps it has and which part of its stage a bar covers:

    bar = ctx.progress.bar("reverse backdoored", total=settings.steps, part=0.5)
    for step in ...: state, metrics = step_fn(state, ...); bar.update(result=metrics)
    bar.close()  # or `with ctx.progress.bar(...) as bar:`

A disabled tracker (`--quiet`, or stderr not a terminal) draws nothing and holds no
results; it is falsy, so `disable=not ctx.progress` keeps working for plain tqdm bars.
`route_logging()` sends absl log lines through `tqdm.write`, so they print above the bars
instead of on them.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Hashable, Iterator

import jax
import tqdm
from absl import logging

# Steps a bar lets run ahead before it blocks on their outputs; it then blocks on the older
# half, so between SYNC_EVERY and 2 * SYNC_EVERY steps stay in flight.
SYNC_EVERY = 4
OUTER_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left"


class Bar:
  """A bar over `total` units of one stage that advances on finished work.

  `update(n, result=x)`: n units were dispatched and are finished when `x` (any pytree of
  arrays) is ready; `update(n)`: n units are finished already (their results were read).
  Outputs handed in must come from one chain of dependent steps, in order.
  """

  def __init__(self, tracker: "Tracker", desc: str, total: int, *, work_per_unit: float,
               initial: int = 0, unit: str = "step", every: int = SYNC_EVERY):
    self._tracker = tracker
    self._work_per_unit = work_per_unit
    self._every = max(1, every)
    self._pending: list[tuple[int, Any]] = []
    self._tqdm = tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                           position=1, dynamic_ncols=True, disable=not tracker.enabled)
    self.finished = initial

  def update(self, n: int = 1, *, result: Any = None) -> None:
    if result is None or not self._tracker.enabled:
      self._advance(n)
      return
    self._pending.append((n, result))
    if len(self._pending) >= 2 * self._every:
      self._release(len(self._pending) - self._every)

  def set_postfix(self, **values) -> None:
    self._tqdm.set_postfix(**values)

  def _release(self, count: int) -> None:
    """Blocks on the oldest `count` pending outputs, then counts their units as finished."""
    released, self._pending = self._pending[:count], self._pending[count:]
    jax.block_until_ready([result for _, result in released])
    self._advance(sum(n for n, _ in released))

  def _advance(self, n: int) -> None:
    self.finished += n
    self._tqdm.update(n)
    self._tracker.advance(n * self._work_per_unit)

  def close(self) -> None:
    """Waits for the outputs still pending (their units are then finished) and closes."""
    if self._pending:
      self._release(len(self._pending))
    self._tqdm.close()

  def __enter__(self) -> "Bar":
    return self

  def __exit__(self, *exc_info) -> None:
    if exc_info[0] is None:
      self.close()
    else:  # Do not wait on outputs of a failed computation.
      self._pending = []
      self._tqdm.close()


class Tracker:
  """Whole-run (or whole-grid) progress over planned work, and the stage bars inside it.

  Work is in any unit proportional to time (linfjax's pipeline uses image passes, see
  `pipeline.estimate_work`). `plan(key, {stage: work})` adds a run's unfinished stages;
  `stage(key, name)` brackets a stage so that its bars move the outer bar and, at its end,
  the outer bar holds exactly the stage's planned work (an estimate that was off is
  corrected there, not carried on). Work a killed process finished before (a bar's
  `initial`) and the rest of a failed run (`abandon`) leave the total, so the outer bar's
  rate and remaining time count only work done, and to be done, in this process.
  """

  def __init__(self, *, enabled: bool, desc: str = "run"):
    self.enabled = enabled
    self._desc = desc
    self._plans: dict[Hashable, dict[str, float]] = {}  # Work to do here, per run and stage.
    self._done: dict[Hashable, float] = {}  # Work done here, per run.
    self._outer: tqdm.tqdm | None = None
    self._current: tuple[Hashable, str] | None = None
    self._stage_size = 0.0  # The current stage's planned work when it started.
    self._stage_done = 0.0

  def __bool__(self) -> bool:
    return self.enabled

  @property
  def total(self) -> float:
    return sum(sum(plan.values()) for plan in self._plans.values())

  @property
  def done(self) -> float:
    return sum(self._done.values())

  def plan(self, key: Hashable, stage_work: dict[str, float]) -> None:
    """Adds the unfinished stages of run `key` (once; a second plan of `key` is ignored)."""
    if key in self._plans:
      return
    self._plans[key] = {stage: float(work) for stage, work in stage_work.items()}
    self._refresh_total()

  def _refresh_total(self) -> None:
    if not self.enabled:
      return
    if self._outer is None:
      self._outer = tqdm.tqdm(total=self.total, desc=self._desc, position=0, leave=True,
                              smoothing=0, bar_format=OUTER_FORMAT, dynamic_ncols=True)
    else:
      self._outer.total = self.total
      self._outer.refresh()

  def abandon(self, key: Hashable) -> None:
    """Takes what is left of run `key`'s work out of the total (a run that failed)."""
    if key in self._plans:
      self._plans[key] = {"done": self._done.get(key, 0.0)}
      self._refresh_total()

  @contextlib.contextmanager
  def stage(self, key: Hashable, name: str) -> Iterator[None]:
    """Brackets stage `name` of run `key`; on success the outer bar gets its full work."""
    self._current, self._stage_done = (key, name), 0.0
    self._stage_size = self._planned()
    try:
      yield
      self.advance(self._planned() - self._stage_done, force=True)
    finally:
      self._current = None

  def _planned(self) -> float:
    if self._current is None:
      return 0.0
    key, name = self._current
    return self._plans.get(key, {}).get(name, 0.0)

  def bar(self, desc: str, total: int, *, part: float = 1.0, initial: int = 0,
          unit: str = "step", every: int = SYNC_EVERY) -> Bar:
    """A bar for `total` units that together are `part` of the current stage's work.

    `initial` units were finished by an earlier (killed) process: they are shown as done
    and leave the outer bar's total, so they do not inflate its rate.
    """
    work_per_unit = self._stage_size * part / max(total, 1)
    if initial and self._current is not None:
      key, name = self._current
      plan = self._plans[key]
      plan[name] = max(0.0, plan[name] - initial * work_per_unit)
      self._refresh_total()
    return Bar(self, desc, total, work_per_unit=work_per_unit, initial=initial, unit=unit,
               every=every)

  def advance(self, work: float, *, force: bool = False) -> None:
    """Moves the outer bar by `work`, within what the current stage has left unless forced."""
    if self._current is None:
      return
    if not force:
      work = min(work, self._planned() - self._stage_done)
    work = max(0.0, work)
    self._stage_done += work
    key = self._current[0]
    self._done[key] = self._done.get(key, 0.0) + work
    if self._outer is not None and work > 0:
      self._outer.update(work)

  def close(self) -> None:
    if self._outer is not None:
      self._outer.close()
      self._outer = None


class _ThroughBars:
  """A stream for logging handlers that prints with `tqdm.write`, above any open bar."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    if text.strip():
      tqdm.tqdm.write(text.rstrip("\n"), file=self._stream)

  def flush(self) -> None:
    self._stream.flush()


@contextlib.contextmanager
def route_logging() -> Iterator[None]:
  """absl log lines go through `tqdm.write` (to stderr) while the block runs."""
  handler = logging.get_absl_handler().python_handler
  original = handler.stream
  handler.stream = _ThroughBars(sys.stderr)
  try:
    yield
  finally:
    handler.stream = original
