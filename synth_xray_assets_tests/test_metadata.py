"""Tables in asset metadata: typed columns, so the UI shows numbers in their cells."""

import dagster as dg
import numpy as np
import pandas as pd

from synth_xray_assets.metadata import metadata_table


def test_columns_are_typed_and_missing_values_are_empty_cells():
    frame = pd.DataFrame(
        {
            "space": ["cxr", "inception"],
            "n": pd.array([32, None], dtype="Int64"),
            "fid": [12.5, np.nan],
            "kid": [np.inf, 0.1],
            "ok": [True, False],
        }
    )
    value = metadata_table(frame)
    assert isinstance(value, dg.TableMetadataValue)
    assert {c.name: c.type for c in value.schema.columns} == {
        "space": "string",
        "n": "int",
        "fid": "float",
        "kid": "float",
        "ok": "bool",
    }
    assert [r.data for r in value.records] == [
        {"space": "cxr", "n": 32, "fid": 12.5, "kid": None, "ok": True},
        {"space": "inception", "n": None, "fid": None, "kid": 0.1, "ok": False},
    ]


def test_the_index_becomes_the_first_column():
    counts = pd.DataFrame(
        {"NORMAL": [3, 5], "PNEUMONIA": [4, 9]}, index=pd.Index(["test", "train"], name="split")
    )
    value = metadata_table(counts, index=True)
    assert [c.name for c in value.schema.columns] == ["split", "NORMAL", "PNEUMONIA"]
    assert value.records[1].data == {"split": "train", "NORMAL": 5, "PNEUMONIA": 9}
    assert metadata_table(counts.iloc[:0]).records == []
