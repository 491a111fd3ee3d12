"""A rerun resumes from the newest complete checkpoint; one cut short is named and set aside, never loaded.

- `prepare_resume` points `latest-rank0.pt` at the newest complete checkpoint, renames the incomplete newer ones
  to `*.incomplete`, and raises, naming the file and what to do, when no complete checkpoint is left.
- Loading a file cut short names it (`IncompleteCheckpointError`), whether a user gave it or Composer found it.
- train.py with the tiny stage config as it is (autoresume on, save_overwrite off): a rerun of a finished run
  resumes and stops; a rerun after the newest checkpoint was cut short resumes from the one before it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_safe_checkpoint import toy_diffusion_task, toy_run  # noqa: F401  (the fixture replaces the task)

import train
from micro_diffusion.models.checkpoints import IncompleteCheckpointError
from micro_diffusion.training.resume import INCOMPLETE_SUFFIX, prepare_resume
from micro_diffusion.training.safe_checkpoint import load_training_checkpoint


def write_checkpoint(folder: Path, batch: int, truncate: bool = False) -> Path:
    path = folder / f"ep0-ba{batch}-rank0.pt"
    torch.save({"state": {"model": {"w": torch.full((256,), float(batch))}}}, path)
    if truncate:
        os.truncate(path, path.stat().st_size // 2)
    return path


def link_latest(folder: Path, checkpoint: Path) -> Path:
    latest = folder / "latest-rank0.pt"
    latest.unlink(missing_ok=True)
    latest.symlink_to(checkpoint.name)
    return latest


def test_a_fresh_or_sound_folder_is_left_as_it_is(tmp_path):
    assert prepare_resume(str(tmp_path / "missing"), "run") == []
    assert prepare_resume(str(tmp_path), "run") == []
    link_latest(tmp_path, write_checkpoint(tmp_path, 4))
    write_checkpoint(tmp_path, 2)
    assert prepare_resume(str(tmp_path), "run") == []
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba4-rank0.pt"


@pytest.mark.parametrize("linked_to_the_cut_one", [True, False])
def test_the_latest_link_moves_to_the_newest_complete_checkpoint(tmp_path, linked_to_the_cut_one):
    good = write_checkpoint(tmp_path, 2)
    cut = write_checkpoint(tmp_path, 4, truncate=True)  # killed while writing: the link may or may not be updated
    link_latest(tmp_path, cut if linked_to_the_cut_one else good)
    notes = prepare_resume(str(tmp_path), "run")
    assert os.readlink(tmp_path / "latest-rank0.pt") == good.name
    assert not cut.exists() and cut.with_name(cut.name + INCOMPLETE_SUFFIX).exists(), "set aside, not deleted"
    assert str(cut) in notes[0] and "incomplete" in notes[0]
    assert len(notes) == (2 if linked_to_the_cut_one else 1)


def test_a_missing_link_points_to_the_newest_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    notes = prepare_resume(str(tmp_path), "run")
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba4-rank0.pt" and "missing" in notes[0]


def test_no_complete_checkpoint_left_names_the_file_and_what_to_do(tmp_path):
    link_latest(tmp_path, write_checkpoint(tmp_path, 2, truncate=True))
    with pytest.raises(IncompleteCheckpointError, match=r"latest-rank0\.pt -> ep0-ba2-rank0\.pt.*move .* away.*"
                                                        r"trainer\.load_path.*ep0-ba2-rank0\.pt is incomplete"):
        prepare_resume(str(tmp_path), "run")


def test_loading_a_file_cut_short_names_it(tmp_path):
    cut = write_checkpoint(tmp_path, 2, truncate=True)
    with pytest.raises(IncompleteCheckpointError, match=rf"{cut}.*cut short"):
        load_training_checkpoint(cut)


def test_a_rerun_resumes_and_falls_back_past_a_checkpoint_cut_short(tmp_path, capsys):
    folder = tmp_path / "run"
    run = toy_run(folder, "trainer.max_duration=3ba")
    assert run.trainer.autoresume and not run.trainer.save_overwrite, "the stage config resumes by default"
    train.train(run)
    assert int(train.train(run).state.timestamp.batch) == 3, "a rerun of a finished run resumes and stops"

    cut = folder / "ep0-ba3-rank0.pt"
    os.truncate(cut, cut.stat().st_size // 2)  # as a kill during the save would leave it (behind a good link)
    link_latest(folder, cut)
    trainer = train.train(toy_run(folder, "trainer.max_duration=4ba"))
    assert int(trainer.state.timestamp.batch) == 4
    assert "ep0-ba3-rank0.pt is incomplete" in capsys.readouterr().out
    assert (folder / "ep0-ba3-rank0.pt").stat().st_size > cut.with_name(cut.name + INCOMPLETE_SUFFIX).stat().st_size
