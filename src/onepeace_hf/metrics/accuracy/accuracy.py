"""Classification accuracy (the fraction of predictions equal to their reference label) as an `evaluate` metric.

Shipped with the package because `evaluate.load("accuracy")` fetches its script from the Hub, which an offline
machine cannot reach; this file loads with `evaluate.load(<path>)`.

    metric = onepeace_hf.training.classification.load_accuracy_metric()
    metric.add_batch(predictions=logits.argmax(-1), references=labels)
    metric.compute()   # {"accuracy": ...}
"""

import datasets
import evaluate
import numpy as np


_INPUTS = """
Args:
    predictions: (n,) predicted class indices.
    references: (n,) true class indices.
Returns:
    accuracy: correct / n, in [0, 1].
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("No predictions to score.")
        return {"accuracy": float((predictions == references).mean())}
