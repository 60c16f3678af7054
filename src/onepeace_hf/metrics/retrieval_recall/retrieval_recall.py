"""Cross-modal retrieval recall (R@k in both directions, and their mean) as an `evaluate` metric.

The rows given to `add` / `add_batch` / `compute` are the items of one side (e.g. captions): `embeds` and
`paired_index`, the row of `reference_embeds` (e.g. the image) each one belongs to, so an image may own several
captions. `reference_embeds`, the other side, is a keyword of `compute`.

    metric = onepeace_hf.retrieval_metrics.load_retrieval_metric()   # or evaluate.load("<this file>")
    metric.add_batch(embeds=text_embeds, paired_index=image_of_each_text)
    metric.compute(reference_embeds=image_embeds, reference_name="image", name="text", ks=(1, 5, 10))
    # {"image_to_text_R@1": ..., "text_to_image_R@1": ..., ..., "mean_recall": ...}

Similarity is the dot product of the embeddings (pass L2-normalized ones); ties count against the correct item.
"""

import datasets
import evaluate
import torch

from onepeace_hf.retrieval_metrics import bidirectional_retrieval_recall


_INPUTS = """
Args:
    embeds: (n, dim) embeddings of the rows (e.g. captions).
    paired_index: (n,) row of `reference_embeds` that each row belongs to.
    reference_embeds: (m, dim) embeddings of the other side (e.g. images), given to `compute`.
    reference_name, name: names used in the result keys (default "image" and "text").
    ks: the k of R@k (default 1, 5, 10).
Returns:
    `{reference_name}_to_{name}_R@k` and `{name}_to_{reference_name}_R@k` in percent, and `mean_recall`.
"""


class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="ONE-PEACE: Exploring One General Representation Model Toward Unlimited Modalities (2023)",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"embeds": datasets.List(datasets.Value("float32")), "paired_index": datasets.Value("int64")}
            ),
        )

    def _compute(self, embeds, paired_index, reference_embeds, reference_name="image", name="text", ks=(1, 5, 10)):
        return bidirectional_retrieval_recall(
            torch.as_tensor(reference_embeds, dtype=torch.float32),
            torch.as_tensor(embeds, dtype=torch.float32),
            a_name=reference_name,
            b_name=name,
            b_to_a=list(paired_index),
            ks=ks,
        )
