"""The demo runs end to end at tiny settings and writes its table and plot."""
import torch

from lowrank_kernels.demo.__main__ import demo
from lowrank_kernels.demo.data import load_splits


def test_demo_tiny(tmp_path):
    rows = demo(["--steps", "3", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
                 "--batch-size", "2", "--eval-batches", "1", "--rank", "4", "--out", str(tmp_path),
                 "--optimizers", "adamw", "galore-torch", "ours", "ours-layerwise"])
    names = [r["optimizer"] for r in rows]
    assert names[0] == "adamw" and names[-2:] == ["ours", "ours-layerwise"]  # galore-torch when installed
    ours, layerwise = rows[-2], rows[-1]
    assert ours["losses"] == layerwise["losses"] and ours["eval loss"] == layerwise["eval loss"]
    if "galore-torch" in names:  # identical numbers on CPU in fp32
        assert rows[1]["losses"] == ours["losses"]
    assert int(ours["optimizer-state bytes"].replace(",", "")) < int(rows[0]["optimizer-state bytes"].replace(",", ""))
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    # The demo trains on the GPU when there is one; its table then reports peak CUDA memory.
    assert ("n/a (CPU)" in table) != torch.cuda.is_available()
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_corpus_ships_with_a_licence_header_and_a_held_out_split():
    from lowrank_kernels.demo.data import CORPUS_PATH
    assert "PSF License" in CORPUS_PATH.read_text(encoding="utf-8").splitlines()[0]
    train, held_out = load_splits()
    assert 300_000 < len(train) + len(held_out) < 500_000 and len(held_out) > 30_000
