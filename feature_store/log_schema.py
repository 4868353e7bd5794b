"""Arrow schemas of the prediction and feedback logs, derived from the feature spec.

An explicit schema (rather than inferring from the first batch) keeps every segment of a stream identical, so a
day's segments concatenate without casts and a schema change in the spec is visible as a schema change here.
"""

from __future__ import annotations

import pyarrow as pa

from feature_store.spec import FeatureSpec, FeatureType

TS = pa.timestamp("us", tz="UTC")
PREDICTIONS = "logs/predictions"
FEEDBACK = "logs/feedback"


def feature_field(name: str, ftype: FeatureType) -> pa.Field:
    return pa.field(name, pa.float64() if ftype is FeatureType.NUMERIC else pa.string())


def features_schema(spec: FeatureSpec) -> pa.Schema:
    return pa.schema([feature_field(n, f.type) for n, f in spec.features.items()])


def prediction_schema(spec: FeatureSpec) -> pa.Schema:
    base = [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("served_at", TS, nullable=False),
        pa.field(spec.event_time, TS),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
    ]
    return pa.schema(base + list(features_schema(spec)))


def feedback_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("label", pa.float64(), nullable=False),
            pa.field("label_time", TS),  # the client's own time of the outcome; null when it did not say
            pa.field("received_at", TS, nullable=False),
        ]
    )
