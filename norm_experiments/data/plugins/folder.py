"""A plain folder: images/CASE.nii.gz and labels/CASE.nii.gz matched by name, classes from data.labels."""

from __future__ import annotations

from norm_experiments.data.registry import LayoutRecord, register


def case_files(name: str) -> tuple[str, str]:
    return f"images/{name}.nii.gz", f"labels/{name}.nii.gz"


def metadata(gen, cases: list[dict]) -> tuple[str, dict]:
    """No dataset.json: the labels are given in the config (data.labels); <kind>.json records the parameters."""
    labels, provenance = gen.labels(), gen.provenance(cases)
    common = {"name": f"{gen.kind}-{gen.key()}", "description": provenance.pop("description")}
    return f"{gen.kind}.json", {**common, "labels": {str(k): v for k, v in labels.items()}, **provenance}


register(
    LayoutRecord(
        "folder",
        "images/CASE.nii.gz and labels/CASE.nii.gz matched by name; classes from data.labels",
        find="norm_experiments.data.layouts:_find_folder",
        case_files=f"{__name__}:case_files",
        metadata=f"{__name__}:metadata",
    )
)
