"""runtime/progress.py: a pass that runs for minutes says how far it is, now and then."""

from mae_jax.runtime import progress


def test_a_line_every_interval_with_what_is_left(capsys, monkeypatch):
  clock = iter([0.0, 10.0, 31.0, 45.0, 70.0, 100.0])
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  p = progress.PassProgress("kNN features", 1000, every_s=30.0)  # starts at t=0
  for done in (100, 300, 400, 700, 1000):  # at t = 10, 31, 45, 70, 100
    p.update(done)
  lines = capsys.readouterr().out.splitlines()
  # t=31: 300 done in 31 s, 700 left at that pace -> 72 s; t=70: 700 done, 300 left -> 30 s
  assert lines == ["kNN features: 300/1,000 images, 0:01:12 left", "kNN features: 700/1,000 images, 0:00:30 left"]
