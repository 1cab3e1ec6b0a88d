import pytest
import torch

from dlgkit import budget


def test_full_budget_is_default(monkeypatch):
    monkeypatch.delenv("DLGKIT_QUICK", raising=False)
    assert not budget.is_quick()
    assert budget.budget(300, 50) == 300


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_quick_budget(monkeypatch, value):
    monkeypatch.setenv("DLGKIT_QUICK", value)
    assert budget.is_quick()
    assert budget.budget(300, 50) == 50


def test_typo_in_switch_is_an_error(monkeypatch):
    monkeypatch.setenv("DLGKIT_QUICK", "quick")
    with pytest.raises(ValueError, match="DLGKIT_QUICK"):
        budget.is_quick()


@pytest.mark.parametrize("full,quick", [(0, 1), (10, -1), (1.5, 1), (True, 1)])
def test_budget_rejects_bad_counts(full, quick):
    with pytest.raises(ValueError, match="positive int"):
        budget.budget(full, quick)


def test_seed_everything_is_reproducible():
    budget.seed_everything(123)
    a = torch.rand(3)
    budget.seed_everything(123)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(TypeError):
        budget.seed_everything("1")


def test_progress_switch(monkeypatch):
    monkeypatch.setenv("DLGKIT_PROGRESS", "0")
    assert budget.progress_enabled() is False
    assert budget.progress_enabled(True) is True
    monkeypatch.setenv("DLGKIT_PROGRESS", "1")
    assert budget.progress_enabled() is True


def test_device(monkeypatch):
    monkeypatch.setenv("DLGKIT_DEVICE", "cpu")
    assert budget.default_device().type == "cpu"
    monkeypatch.setenv("DLGKIT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="DLGKIT_DEVICE"):
        budget.default_device()


def test_seed_everything_asks_for_full_precision_on_gpus():
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    budget.seed_everything(0)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_thread_policy_shares_the_cores(monkeypatch):
    import os

    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert budget.cores() == 4
    assert [budget.threads_for(p) for p in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    before = torch.get_num_threads()
    try:
        assert budget.use_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert budget.threads_for() == 2 and budget.threads_for(2) == 1
    assert budget.threads_for(batched=False) == 1 and budget.threads_for(2, batched=False) == 1
    with pytest.raises(TypeError, match="batched must be True"):
        budget.threads_for(1, batched="yes")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((TypeError, ValueError), match="processes"):
            budget.threads_for(bad)
