"""Kill-safety, short: SIGKILL one process inside each stage in turn, then finish; results match.

The long version, >= 20 random kills per stage and in a grid:
`python tests/kill_harness.py --trials=20` (see that file).
"""

import os
import random

import kill_harness


def test_killed_in_each_stage_in_turn_then_resumed_matches_an_uninterrupted_run(tmp_path):
  setup = kill_harness.make_setup(str(tmp_path))
  ref = kill_harness.reference(setup, warm=False)  # Also fills the compilation cache.
  rng = random.Random(0)
  workdir = str(tmp_path / "chain")
  kills = []
  for stage in kill_harness.STAGES:
    results = kill_harness._results(workdir) or {}
    if stage in results:
      continue  # An earlier kill landed later than planned: this stage is finished.
    # The reference's stage times include compiling; warm processes run ~3-8x faster.
    delay = rng.uniform(0.0, 0.25 * ref.durations[stage])
    outcome = kill_harness.run(setup, workdir, kill_stage=stage, delay=delay)
    if outcome.killed_in is None:
      assert outcome.returncode == 0, outcome.log[-3000:]
      break
    kills.append(outcome.killed_in)
  final = kill_harness.run(setup, workdir)
  assert final.returncode == 0, final.log[-3000:]
  assert kill_harness.differences(ref.results[""], kill_harness._results(workdir)) == []
  assert os.path.exists(os.path.join(workdir, "report.html"))
  assert len(kills) >= 3, kills  # Killed processes, and the stages they were killed in.
  print(f"killed in: {kills}")
