"""nnU-Net v2 raw: imagesTr/CASE_0000.nii.gz (one file per channel), labelsTr/CASE.nii.gz, dataset.json."""

from __future__ import annotations

from norm_experiments.data.registry import LayoutRecord, register


def case_files(name: str) -> tuple[str, str]:
    return f"imagesTr/{name}_0000.nii.gz", f"labelsTr/{name}.nii.gz"


def metadata(gen, cases: list[dict]) -> tuple[str, dict]:
    labels, provenance = gen.labels(), gen.provenance(cases)
    return "dataset.json", {
        "name": f"{gen.kind}-{gen.key()}",
        "description": provenance.pop("description"),
        "channel_names": {"0": gen.modality()},
        "labels": {v: k for k, v in labels.items()},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        gen.kind: provenance,
    }


register(
    LayoutRecord(
        "nnunet",
        "nnU-Net v2 raw: imagesTr/CASE_0000.nii.gz per channel, labelsTr/, dataset.json",
        find="norm_experiments.data.layouts:_find_nnunet",
        case_files=f"{__name__}:case_files",
        metadata=f"{__name__}:metadata",
        channels_from="dataset.json 'channel_names'",
    )
)
