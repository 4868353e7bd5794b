"""Every error Flywheel raises on purpose, in one hierarchy, with the retry policy attached to the class.

Two kinds, because an unattended loop must tell them apart:

- `Decision`: Flywheel looked at the input and refused (no data for the day, the gate failed, a spec or a
  request that cannot be used, the champion moved under us). Running the same thing again gives the same
  answer, so Airflow must not retry it: the task fails at once with the message, which says what to change.
- `Fault`: something outside the decision failed (the prediction log cannot be written, the online store is
  unreachable). It may pass, so Airflow's retry policy applies and the server answers 503 with Retry-After.

Anything else (a bug, a library error) is treated like a fault by Airflow. This module imports nothing from
the project, so every layer (`feature_store`, `serving`, `pipeline`) may raise from it.
"""

from __future__ import annotations


class FlywheelError(Exception):
    """Base of every error Flywheel raises on purpose."""

    retryable: bool = False


class Decision(FlywheelError):
    """A refusal that is the same on every retry; the message names what to change."""

    retryable = False


class Fault(FlywheelError):
    """A failure that may pass on its own (I/O, a service down): safe to retry."""

    retryable = True


# --- decisions ---------------------------------------------------------------------------------------------
class SpecError(Decision, ValueError):
    """A feature spec that cannot be used; the message names the file and the key."""


class SettingsError(Decision, ValueError):
    """A setting (an environment variable or an option) whose value cannot be used; the message names it."""


class EntityTableError(Decision, ValueError):
    """Input that cannot become an entity table; the message names the entity and the column."""


class StageError(Decision, RuntimeError):
    """A stage refused to proceed; the message says why and what to do."""


class NoDataError(StageError):
    """The day has nothing to work on (no logs, no validated partition)."""


class NothingToTrain(StageError):
    """The night has nothing to train yet. Not a failure: the rest of the night is skipped (in Airflow, the
    downstream tasks), and the run succeeds."""


class Accumulating(NothingToTrain):
    """The night has too few labeled rows to train on yet. Its days are validated and kept; a later night pools
    them with its own."""


class GateFailed(StageError):
    """The day's data failed the validation gate."""


class SuiteFileError(StageError):
    """A user expectation suite file that cannot be used; the message names the file and the entry."""


class AliasConflict(Decision, RuntimeError):
    """The champion alias is not where this run expected it: another run moved it first."""


class PromotionRefused(StageError):
    """The guarded champion move refused a version: rejected or not approved in review, rolled back, or failed
    its gate. No path (nightly promote, canary, CLI, rollback) gets around it."""


class SegmentRejected(Decision, ValueError):
    """A log segment that no safe cast can bring to the spec's log schema (moved to `rejected/`)."""


class RequestError(Decision, ValueError):
    """A request the server refuses; `status` is the HTTP status it answers with (4xx)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class TrainingFailed(Decision, RuntimeError):
    """The training job failed on its own (exit code, OOM, crash, bad input): a retry fails the same way."""


class DeadlinePassed(Decision, RuntimeError):
    """The night's training deadline has passed: the model stays as it is until the next night."""


# --- faults ------------------------------------------------------------------------------------------------
class ModelOutputInvalid(Fault, RuntimeError):
    """The served model produced non-finite scores for a request: answered 5xx with this reason, never 200."""


class LogUnavailable(Fault, RuntimeError):
    """The log cannot accept rows (unwritable spool or lake): predictions must not be served unlogged."""


class OnlineStoreError(Fault, RuntimeError):
    """The online store is misconfigured or unreachable; the message names the URI."""


class ServiceUnavailable(Fault, RuntimeError):
    """A service a command needs (MLflow, the model server) does not answer; the message names the fix."""


class Preempted(Fault, RuntimeError):
    """The training pod or process was taken away (preempted, evicted, node drained): retry, it resumes from the
    newest checkpoint of that day's run."""
