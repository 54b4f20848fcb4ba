"""The runner's pure parts: front-page verdict marks, profile and notebook checks."""
import pytest

from cmm_utils import runner


@pytest.mark.parametrize("verdict, mark", [("supported", "yes"), ("not supported", "**no**"),
                                           ("inconclusive", "inconclusive"), ("not testable here", "not testable here"),
                                           ("not run", "not run")])
def test_front_page_marks_follow_the_verdict_words(verdict, mark):
    assert runner.verdict_mark({"claim": "c", "verdict": verdict}) == mark


def test_an_unknown_verdict_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'probably'.*supported, not supported, inconclusive"):
        runner.verdict_mark({"claim": "c", "verdict": "probably"})


def test_machine_names_cpu_torch_and_threads():
    m = runner.machine()
    assert {"cpu", "torch", "threads", "cores"} <= set(m) and m["threads"] >= 1
