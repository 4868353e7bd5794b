"""The run note says what decided the night, from the stages' XComs alone."""

from __future__ import annotations

from pipeline.orchestration.run_note import compose

EVAL = {"champion_version": "6", "candidate": {"auc": 0.7123}, "champion": {"auc": 0.7051},
        "auc_diff": {"estimate": 0.0072, "low": 0.0031, "high": 0.0113}}


def test_a_promotion_names_version_comparison_ci_and_what_is_served():
    note = compose({"evaluate": EVAL, "promote": {"version": "7", "promoted": True},
                    "rollout": {"served_version": "7"}}, {})
    assert note == "v7 promoted: AUC 0.712 vs champion v6 0.705 (+0.007, CI [+0.003, +0.011]); serving v7"


def test_a_refusal_carries_the_promote_reason():
    note = compose({"evaluate": EVAL, "promote": {"version": "7", "promoted": False,
                                                  "reason": "worse on slice new_users"}}, {})
    assert note.startswith("v7 not promoted: AUC 0.712") and note.endswith("; worse on slice new_users")


def test_the_first_failed_stage_explains_the_night():
    note = compose({"collect": {"rows": 10}}, {"validate": "gate failed: 41% rows quarantined",
                                                "train": "never reached"})
    assert note == "validate stopped the night: gate failed: 41% rows quarantined"


def test_a_run_without_results_or_errors_says_how_far_it_got():
    assert compose({"collect": {"rows": 1}}, {}) == "incomplete: last finished stage collect"
    assert len(compose({}, {"collect": "x" * 5000})) == 1000


def test_a_loop_health_alarm_is_appended_to_the_outcome():
    note = compose({"evaluate": EVAL, "promote": {"version": "7", "promoted": False, "reason": "r"}}, {},
                   "6 nights without a promotion")
    assert note.startswith("v7 not promoted") and note.endswith(" | loop health: 6 nights without a promotion")
