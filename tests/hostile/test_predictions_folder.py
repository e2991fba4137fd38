"""norm-exp-check save_predictions=DIR owns its folder from the start: two checks started with the same new
folder used to both exit 0 with their maps mixed under one index, and a folder that cannot be written failed
only after the whole check had run."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from norm_experiments.check_network import CLAIM, predictions_target, release_predictions
from norm_experiments.errors import UserError


def target(folder: Path) -> Path | None:
    return predictions_target(OmegaConf.create({"save_predictions": str(folder)}))


def test_a_second_check_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    assert target(folder) == folder and (folder / CLAIM).exists()
    with pytest.raises(UserError, match="another check is writing there"):
        target(folder)
    release_predictions(folder, written=True)
    assert folder.is_dir() and not (folder / CLAIM).exists()


def test_a_folder_that_cannot_be_made_fails_before_the_check(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(UserError, match="cannot write there"):
        target(tmp_path / "a_file" / "maps")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_failed_check_leaves_no_empty_folder_and_keeps_a_users_files(tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    target(folder)
    release_predictions(folder, written=False)
    assert not folder.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        target(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_an_empty_folder_or_file_name_is_named_empty(tmp_path) -> None:
    """save_predictions= (empty) became "." and was refused as "exists and is not an empty folder"."""
    import pytest

    from norm_experiments.check_network import repaired_target
    from norm_experiments.errors import UserError

    with pytest.raises(UserError, match=r"^save_predictions=: empty; give a new folder$"):
        predictions_target(OmegaConf.create({"save_predictions": ""}))
    with pytest.raises(UserError, match=r"^write_repaired=: empty; give a new file$"):
        repaired_target(OmegaConf.create({"write_repaired": ""}), tmp_path / "w.pt")
