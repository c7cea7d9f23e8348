"""The one periodic rule of images, evaluation and checkpoints (ddpo_jax/periodic.py)."""

from ddpo_jax import periodic


def test_every_n_epochs_and_after_the_last():
  assert [e for e in range(12) if periodic.is_due(e, 12, 4)] == [3, 7, 11]
  assert [e for e in range(10) if periodic.is_due(e, 10, 4)] == [3, 7, 9]
  assert [e for e in range(3) if periodic.is_due(e, 3, 1)] == [0, 1, 2]
  assert [e for e in range(5) if periodic.is_due(e, 5, 10)] == [4]


def test_zero_turns_it_off():
  assert not any(periodic.is_due(e, 12, 0) for e in range(-1, 12))
