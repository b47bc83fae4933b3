"""diffcli.atomic: a stop signal that lands during a write waits for it to finish."""

import os
import signal

import pytest

from diffcli import atomic


def test_a_signal_during_a_write_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM sent while the temporary file is being fsynced: the write still publishes the whole
    file and leaves no temporary file; the handler (here: KeyboardInterrupt, as the CLI's) runs after."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    real_fsync = os.fsync
    sent = []

    def fsync_and_signal(fd):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # held until write_bytes returns
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_and_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic.write_bytes(tmp_path / "x.bin", b"all of it", overwrite=False)
            for _ in range(1000):  # the held signal is delivered once the mask is restored
                pass
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sent == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    assert (tmp_path / "x.bin").read_bytes() == b"all of it"
