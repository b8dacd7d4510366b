"""Saving and storing where nothing can be written: a StateFileError naming the path the user
gave (not the temporary file beside it), nothing written, any earlier file intact; and a load
onto something that is not a network.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

import gapa
import gapa.persistence

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    return gapa.GAPA(model, m=8).fit(torch.randn(40, 4))


def test_save_under_a_file_names_the_file_in_the_way(fitted, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    target = tmp_path / "taken" / "sub" / "m.gapa"
    with pytest.raises(gapa.StateFileError, match="taken is a file, not a directory") as info:
        fitted.save(target)
    assert str(target) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_failed_write_names_the_path_and_keeps_the_earlier_file(fitted, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "m.gapa")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gapa.persistence, "save_file", disk_full)
    with pytest.raises(gapa.StateFileError, match="No space left on device") as info:
        fitted.save(path)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.gapa"]  # no temporary left behind


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_store_that_cannot_be_a_directory_is_a_state_file_error(fitted, tmp_path, where):
    (tmp_path / "taken").write_text("not a directory")
    store = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "store"
    x = torch.randn(3, 4)
    before = fitted(x).var
    with pytest.raises(gapa.StateFileError, match="taken is a file, not a directory"):
        fitted.fit(torch.randn(40, 4), store=store)
    assert torch.equal(fitted(x).var, before)


def test_load_onto_something_that_is_not_a_module_is_an_input_error(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.gapa")
    with pytest.raises(gapa.InputError, match=r"torch\.nn\.Module"):
        gapa.GAPA.load(path, fitted.model.state_dict())
