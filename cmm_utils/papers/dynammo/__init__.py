"""DynaMMo (Qazi et al., MIUA 2024, arXiv:2404.14099): one merged set of residual adapters instead
of one network path per task, with ACL, DER, fine-tuning and joint training beside it.

The rooms: :mod:`.adapters` (the adapter network, the merge, min-others inference), :mod:`.method`
(stage 1 with the memory, stage 2 and the merge: DynaMMo and ACL), :mod:`.common` (memory, training
on features, evaluation), :mod:`.baselines` (DER, fine-tuning, joint), :mod:`.costs` (cost as T
grows), :mod:`.scenarios`, :mod:`.profiles`, :mod:`.runs` (the cached run, the page's tables) and
:mod:`.claims` (the paper's claims, judged). The book's interface: :data:`CHAPTER`, :data:`TITLE`,
:data:`PROFILES`, :data:`METHODS` and :func:`run`.
"""
from cmm_utils.papers.dynammo.adapters import AdapterNet
from cmm_utils.papers.dynammo.claims import PAPER, claims_table, judge_claims, reference_table, verdict_summary
from cmm_utils.papers.dynammo.costs import adapter_parameters, chapter_costs, cost_growth
from cmm_utils.papers.dynammo.profiles import CHAPTER, METHOD_LABELS, METHODS, PROFILES, TITLE
from cmm_utils.papers.dynammo.runs import chapter_runs, run
from cmm_utils.papers.dynammo.scenarios import SCENARIOS, headline_metric, scenario_label

__all__ = ["CHAPTER", "TITLE", "PROFILES", "METHODS", "run",
           # what the chapter's page reads
           "AdapterNet", "METHOD_LABELS", "PAPER", "SCENARIOS", "adapter_parameters", "chapter_costs", "chapter_runs",
           "claims_table", "cost_growth", "headline_metric", "judge_claims", "reference_table", "scenario_label",
           "verdict_summary"]
