"""The Medical Segmentation Decathlon layout: ROOT/dataset.json with a "training" list, imagesTr/, labelsTr/."""

from __future__ import annotations

from norm_experiments.data.registry import LayoutRecord, register


def case_files(name: str) -> tuple[str, str]:
    return f"imagesTr/{name}.nii.gz", f"labelsTr/{name}.nii.gz"


def metadata(gen, cases: list[dict]) -> tuple[str, dict]:
    labels, provenance = gen.labels(), gen.provenance(cases)
    training = []
    for c in cases:
        image, label = case_files(c["name"])
        training.append({"image": f"./{image}", "label": f"./{label}"})
    return "dataset.json", {
        "name": f"{gen.kind}-{gen.key()}",
        "description": provenance.pop("description"),
        "tensorImageSize": "3D",
        "modality": {"0": gen.modality()},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": len(cases),
        "numTest": 0,
        "training": training,
        "test": [],
        gen.kind: provenance,
    }


register(
    LayoutRecord(
        "msd",
        "Medical Segmentation Decathlon: dataset.json with a 'training' list, imagesTr/, labelsTr/",
        find="norm_experiments.data.layouts:_find_msd",
        case_files=f"{__name__}:case_files",
        metadata=f"{__name__}:metadata",
        channels_from="dataset.json 'modality'",
    )
)
