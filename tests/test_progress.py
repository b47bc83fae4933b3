"""Progress in a log: one line per --log-every seconds (not per update), with a rate-based ETA."""

from diffcli import progress
from diffcli.progress import Progress, duration


def test_lines_every_log_every_seconds_with_eta(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with Progress("training", log_every=30) as bar:
        for step in range(1, 101):  # one step a second
            clock[0] += 1.0
            bar.update(step, 100, loss=0.25, images_per_second=64.0)
    lines = capsys.readouterr().err.splitlines()
    # the first update starts the clock of the rate; lines at 30 s, 60 s, 90 s after the start
    assert lines == [
        "training 30/100  loss 0.2500  64 img/s  elapsed 30s  ETA 1m10s",
        "training 60/100  loss 0.2500  64 img/s  elapsed 1m00s  ETA 40s",
        "training 90/100  loss 0.2500  64 img/s  elapsed 1m30s  ETA 10s",
    ]


def test_quiet_prints_nothing(monkeypatch, capsys):
    with Progress("sampling", quiet=True, log_every=0) as bar:
        bar.update(1, 2)
        bar.log("hello")
    assert capsys.readouterr().err == ""


def test_duration():
    assert [duration(s) for s in (0, 59.4, 61, 3600, 3725 * 2)] == ["0s", "59s", "1m01s", "1h00m", "2h04m"]
