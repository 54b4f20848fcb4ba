"""The data chapter's must-show: any MedMNIST-format file works; an unknown name fails clearly."""
from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.timeout(900)
def test_data_chapter_on_a_file_the_book_has_never_seen(unseen_npz, tmp_path):
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / "00_data.ipynb"), str(out), cwd=str(NOTEBOOKS), kernel_name="python3",
                        parameters={"profile": "smoke", "dataset": str(unseen_npz)}, progress_bar=False)
    text = out.read_text()
    assert "digits_unseen" in text and "all checks passed" in text


@pytest.mark.timeout(900)
def test_data_chapter_names_an_unknown_dataset_and_the_valid_ones(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(NOTEBOOKS / "00_data.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(NOTEBOOKS),
                            kernel_name="python3", parameters={"profile": "smoke", "dataset": "no_such_set"},
                            progress_bar=False)
    message = str(err.value)
    assert "no_such_set" in message and "retinamnist" in message and "ham10000" in message
