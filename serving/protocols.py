"""Other clients' wire formats mapped onto Flywheel's `{"rows": [...]}`, so existing MLflow-scoring and Open
Inference Protocol (v2) clients work unchanged against the same validation, scoring and logging path."""

from __future__ import annotations

from pipeline.errors import RequestError


def mlflow_to_rows(body: object) -> list[dict]:
    """MLflow's /invocations payloads: dataframe_split, dataframe_records, or inputs (columnar or records)."""
    if not isinstance(body, dict) or len(body) != 1:
        raise RequestError("body: expected exactly one of 'dataframe_split', 'dataframe_records', 'inputs'")
    (key, value), = body.items()
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list) \
                or not isinstance(value.get("data"), list):
            raise RequestError("dataframe_split: expected {'columns': [...], 'data': [[...], ...]}")
        cols = value["columns"]
        rows = []
        for i, rec in enumerate(value["data"]):
            if not isinstance(rec, list) or len(rec) != len(cols):
                raise RequestError(f"dataframe_split.data[{i}]: expected a list of {len(cols)} values")
            rows.append(dict(zip(cols, rec, strict=True)))
        return rows
    if key == "dataframe_records":
        if not isinstance(value, list):
            raise RequestError("dataframe_records: expected a list of objects")
        return value
    if key == "inputs":
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            return _columns_to_rows({k: v for k, v in value.items()}, "inputs")
        raise RequestError("inputs: expected a list of records or an object of columns")
    raise RequestError(f"body: unknown key {key!r}; expected 'dataframe_split', 'dataframe_records' or 'inputs'")


def _columns_to_rows(columns: dict[str, object], where: str) -> list[dict]:
    lengths = set()
    for name, values in columns.items():
        if not isinstance(values, list):
            raise RequestError(f"{where}.{name}: expected a list of values")
        lengths.add(len(values))
    if len(lengths) != 1:
        raise RequestError(f"{where}: all columns must have the same length, got {sorted(lengths)}")
    n = lengths.pop()
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def v2_to_rows(body: object) -> list[dict]:
    """Open Inference Protocol v2: one named input tensor per feature, each of shape [n] (or [n, 1])."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestError("inputs: expected a non-empty list of {name, shape, datatype, data}")
    columns: dict[str, object] = {}
    for i, tensor in enumerate(body["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(f"inputs[{i}]: expected an object with 'name', 'shape', 'datatype', 'data'")
        data = tensor.get("data")
        if isinstance(data, list) and data and isinstance(data[0], list):
            data = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data]
        columns[tensor["name"]] = data
    return _columns_to_rows(columns, "inputs")


def v2_response(model_name: str, version: str, request_id: str, scores: list[float]) -> dict:
    return {"model_name": model_name, "model_version": version, "id": request_id,
            "outputs": [{"name": "score", "shape": [len(scores)], "datatype": "FP64", "data": scores}]}
