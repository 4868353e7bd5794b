"""Every MLflow registry alias and `flywheel.*` tag name, in one place.

Tags are how stages that never share memory talk through the registry: `register` writes `GATE_PASSED`,
`promote` reads it hours later in another process. A misspelt string literal there would silently mean "never
promote"; a misspelt enum member fails on import. Members are `str`, so they go straight into MLflow calls,
filter strings and JSON. Imports nothing, so DAG parsing may use it.
"""

from __future__ import annotations

from enum import StrEnum


class Alias(StrEnum):
    CHAMPION = "champion"      # what the server answers with
    # a candidate that passed its gate and awaits evidence or a decision (canary traffic when canary_share > 0);
    # cleared when it becomes champion, is rejected, times out in review, is retired by the canary or rolled back
    CHALLENGER = "challenger"
    PREVIOUS = "previous"      # the champion before the last promotion: what a rollback restores


class Tag(StrEnum):
    # lineage, written at training and registration
    KIND = "flywheel.kind"
    MODEL = "flywheel.model_name"             # the registered model a run trains for (part of a night's reuse key)
    DAY = "flywheel.data_day"
    WINDOW = "flywheel.data_window"
    DATA_DIGEST = "flywheel.data_digest"
    POOLED = "flywheel.pooled_days"           # the days a small night trained and was judged on, oldest first
    PARENT = "flywheel.parent_version"
    RUN = "flywheel.run_id"
    WEIGHTS = "flywheel.weights_digest"
    BUNDLE = "flywheel.bundle_digest"
    MODEL_URI = "flywheel.model_uri"
    MODEL_ID = "flywheel.model_id"
    MIGRATION = "flywheel.migration"
    METRICS = "flywheel.metrics"
    POLICY = "flywheel.policy"                # which training policy made the model (warm / shrink / fresh)
    DRIFT_TRIGGER = "flywheel.drift_trigger"  # why a night trained drift challengers ("none" when it did not)
    TRAINING_JOB = "flywheel.training_job"    # KIND/NAMESPACE/NAME of the Kubeflow job that trained it, if one did
    # the promotion gate's decision, written by evaluate/register, read by promote and review
    GATE_PASSED = "flywheel.gate_passed"
    GATE_REASON = "flywheel.gate_reason"
    GATE_CHECKS = "flywheel.gate_checks"
    EVAL_REPORT = "flywheel.eval_report"
    AUC_DIFF_CI = "flywheel.auc_diff_ci"
    # review mode
    APPROVAL = "flywheel.approval"
    APPROVER = "flywheel.approver"
    APPROVAL_AT = "flywheel.approval_at"
    APPROVAL_NOTE = "flywheel.approval_note"
    APPROVAL_OBSERVED_AT = "flywheel.approval_observed_at"
    REVIEW_REQUESTED_AT = "flywheel.review_requested_at"
    REVIEW_TIMED_OUT_AT = "flywheel.review_timed_out_at"
    # champion moves
    PROMOTED = "flywheel.promoted"
    PROMOTED_AT = "flywheel.promoted_at"
    PROMOTED_BY = "flywheel.promoted_by"
    ROLLED_BACK = "flywheel.rolled_back"
    ROLLBACK_REASON = "flywheel.rollback_reason"
    ROLLBACK_AT = "flywheel.rollback_at"
    ROLLBACK_BY = "flywheel.rollback_by"
    RESTORED_FROM = "flywheel.restored_from"
    # live evidence
    CANARY = "flywheel.canary"
    ONLINE_EVAL = "flywheel.online_eval"
    ONLINE_EVAL_AT = "flywheel.online_eval_at"
    # what a person reads on the version page: one sentence, the current state and why
    STATUS = "flywheel.status"


class ModelTag(StrEnum):
    """Tags on the registered model (not a version)."""

    # the alias ledger as JSON pages: `flywheel.alias_history.0000`, `.0001`, ... (each under MLflow's 5000 chars)
    HISTORY_PREFIX = "flywheel.alias_history."


class Why(StrEnum):
    """Why an alias moved: the ledger's `why` column."""

    BOOTSTRAP = "bootstrap"
    NOMINATION = "nomination"        # a candidate passed its gate and became challenger
    PROMOTION = "promotion"          # auto mode: passed the gate
    APPROVAL = "approval"            # review mode: a reviewer approved it
    REJECTION = "rejection"          # a reviewer rejected it (challenger cleared)
    REVIEW_TIMEOUT = "review timeout"
    CANARY = "canary"                # promoted or retired on its own live traffic
    AUTO_ROLLBACK = "automatic rollback"
    ROLLBACK = "rollback"            # by hand (CLI or the rollback DAG)
    UNRECORDED = "moved outside Flywheel"  # the MLflow UI, or a process that died before its ledger write
