"""Asset metadata helpers shared by the domains' wiring: tables the Dagster UI shows as tables."""

from __future__ import annotations

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from synth_xray_assets.settings import Settings


def _column_type(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def _cell(value: Any, kind: str) -> str | int | float | bool | None:
    missing = pd.isna(value)
    if isinstance(missing, (bool, np.bool_)) and missing:  # None, NaN, pd.NA, NaT
        return None
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value) if np.isfinite(float(value)) else None
    return str(value)


def metadata_table(frame: pd.DataFrame, index: bool = False) -> dg.TableMetadataValue:
    """``frame`` as ``dg.MetadataValue.table`` with a ``TableSchema`` (numbers stay numbers;
    NaN and infinities show as empty cells). ``index``: the index becomes the first column."""
    if index:
        frame = frame.reset_index()
    frame = frame.rename(columns=str)
    kinds = {c: _column_type(frame[c].dtype) for c in frame.columns}
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c, type=kinds[c]) for c in frame.columns])
    records = [
        dg.TableRecord({c: _cell(v, kinds[c]) for c, v in zip(frame.columns, row)})
        for row in frame.itertuples(index=False)
    ]
    return dg.MetadataValue.table(records=records, schema=schema)


def settings_metadata(s: Settings) -> dict[str, dg.MetadataValue]:
    """The settings a materialization read: ``settings_sha256`` (a hash of every setting but the data
    root) and ``settings_changed`` (the values that differ from the profile's defaults)."""
    return {
        "settings_sha256": dg.MetadataValue.text(s.digest()),
        "settings_changed": dg.MetadataValue.json(s.changes()),
    }
