"""The runner's pure parts: front-page verdict marks, profile and notebook checks."""
import pytest

from cmm_utils import runner


@pytest.mark.parametrize("claim, mark", [
    ({"supported": True, "paper_value": 10, "ours": 9.6}, "yes"),
    ({"supported": False, "paper_value": 10, "ours": 6.9}, "**no**"),
    ({"supported": None, "paper_value": 77.04, "ours": None}, "not tested here"),
    ({"supported": None, "paper_value": "x", "ours": "not run here: needs a GPU"}, "not tested here"),
    ({"supported": None, "paper_value": "up to +7", "ours": "-1.1 to +6.7"}, "mixed / inconclusive"),
    ({"supported": None, "paper_value": None, "ours": 9.68}, "no paper value (ours for reference)"),
])
def test_a_tested_claim_without_a_verdict_is_mixed_not_untested(claim, mark):
    assert runner.verdict_mark(claim) == mark
