"""diffcli.eval.torchfile: torch.save files read as tensors without running them."""

import os

import pytest
import torch

from diffcli.eval import torchfile


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, generator=g)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.num_batches_tracked": torch.tensor(7),
            "view": base[2:6],  # a tensor sharing a storage at an offset
            "t": torch.randn(3, 5, generator=g).T,  # non-contiguous strides
            "half": torch.randn(3, generator=g).half(), "empty": torch.zeros(0), "flag": torch.tensor([True, False])}


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_save_writes(tmp_path, zip_layout):
    sd = state()
    torch.save(sd, tmp_path / "w.pth", _use_new_zipfile_serialization=zip_layout)
    got = torchfile.read(tmp_path / "w.pth")
    assert list(got) == list(sd)
    for k in sd:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    # a module's state_dict(): an OrderedDict with _metadata state
    bn = torch.nn.BatchNorm2d(3).state_dict()
    torch.save(bn, tmp_path / "bn.pth", _use_new_zipfile_serialization=zip_layout)
    assert list(torchfile.read(tmp_path / "bn.pth")) == list(bn)


class Runs:
    """An object whose deserialisation would run a command (creating a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_nothing_but_tensors_is_built(tmp_path, zip_layout):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": Runs(marker)}, tmp_path / "evil.pth", _use_new_zipfile_serialization=zip_layout)
    with pytest.raises(torchfile.NotTensors, match=f"refers to '{os.system.__module__}.system'"):
        torchfile.read(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"w": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(torchfile.NotTensors, match="mapping of names to tensors"):
        torchfile.read(tmp_path / "list.pth")
    torch.save(torch.zeros(3), tmp_path / "bare.pth")
    with pytest.raises(torchfile.NotTensors, match="mapping of names to tensors"):
        torchfile.read(tmp_path / "bare.pth")


@pytest.mark.parametrize("zip_layout", [True, False], ids=["zip", "legacy"])
def test_truncated_and_damaged_files(tmp_path, zip_layout):
    torch.save(state(), tmp_path / "w.pth", _use_new_zipfile_serialization=zip_layout)
    data = (tmp_path / "w.pth").read_bytes()
    for cut in (1, 5, 60, len(data) // 2, len(data) - 9):
        (tmp_path / "t.pth").write_bytes(data[:cut])
        with pytest.raises(torchfile.NotTensors):
            torchfile.read(tmp_path / "t.pth")
    (tmp_path / "junk.pth").write_bytes(b"hello world")
    with pytest.raises(torchfile.NotTensors, match="neither a torch zip archive nor a torch.save stream"):
        torchfile.read(tmp_path / "junk.pth")


def test_a_tensor_larger_than_its_storage_is_refused():
    """A stride-0 tensor of 2^40 elements over a 1-element storage would allocate terabytes on clone."""
    flat = torch.zeros(1)
    with pytest.raises(torchfile.NotTensors, match="past the end"):
        torchfile._rebuild((flat, 0, (2**40,), (0,), False, {}))
    with pytest.raises(torchfile.NotTensors, match="past the end"):
        torchfile._rebuild((flat, 0, (2,), (1,), False, {}))
    assert torch.equal(torchfile._rebuild((torch.arange(6.0), 1, (2, 2), (1, 2), False, {})), torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
