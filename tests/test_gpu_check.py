"""``make gpu-check``'s CPU dry run: every chapter trains, merges and evaluates on the requested device."""
import pytest
import torch

from cmm_utils import gpu_check


def test_tiny_cpu_dry_run_passes_every_chapter(monkeypatch, capsys):
    monkeypatch.setenv("CMM_DEVICE", "cpu")  # restored afterwards (main sets it to --device)
    monkeypatch.delenv("CMM_PRECISION", raising=False)
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("gpu-check ") and " OK " in line]
    assert [line.split()[1] for line in lines] == list(gpu_check.CHAPTERS)
    for line in lines:
        assert "img/s" in line and "peak GPU memory n/a" in line and "tensors on cpu" in line
    assert "4/4 chapters passed" in out


def test_a_failing_chapter_makes_the_exit_code_non_zero(monkeypatch, capsys):
    monkeypatch.setenv("CMM_DEVICE", "cpu")

    def broken(dev, data, size, meter):
        raise RuntimeError("3 tensor(s) not on cuda: net.head.weight (buffer): cpu")

    monkeypatch.setitem(gpu_check.RUNNERS, "dynammo", broken)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--chapters", "dynammo"]) == 1
    out = capsys.readouterr().out
    assert "gpu-check dynammo   FAILED" in out and "net.head.weight (buffer): cpu" in out
    assert "0/1 chapters passed" in out and "FAILED: dynammo" in out


def test_bad_arguments_are_named(monkeypatch, capsys):
    monkeypatch.setenv("CMM_DEVICE", "cpu")
    with pytest.raises(SystemExit):
        gpu_check.main(["--chapters", "ewc"])
    assert "unknown chapter(s) ['ewc']; valid: magmax, cmm, dynammo, medmerge" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CMM_DEVICE", "cpu")
    with pytest.raises(RuntimeError, match="CMM_DEVICE='cuda' but torch sees no CUDA device"):
        gpu_check.main(["--device", "cuda", "--tiny"])
