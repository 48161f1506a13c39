"""Binary/macro F1, bundled so the recipes run offline (same inputs and output as the Hub's ``f1``)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1: the harmonic mean of precision and recall (binary, or macro over labels)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions and references: lists of integer labels",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        labels = [pos_label] if average == "binary" else sorted(set(references) | set(predictions))
        scores = []
        for label in labels:
            tp = float(((predictions == label) & (references == label)).sum())
            fp = float(((predictions == label) & (references != label)).sum())
            fn = float(((predictions != label) & (references == label)).sum())
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return {"f1": float(np.mean(scores))}
