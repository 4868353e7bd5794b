"""Judgement as pure functions over arrays and frames: metrics, the promotion gate's paired comparisons, drift,
and the HTML/PNG evaluation report. No I/O against the lake or the registry, so every rule is testable on a few
rows. Imports only `feature_store` and third-party numerics."""
