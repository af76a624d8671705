"""ROUGE as a local `evaluate` module (Google's rouge-score package), so it works offline.

Scores are F-measures in [0, 1], averaged over examples (a plain mean, not rouge-score's
bootstrap resampling, so the same predictions always give the same number). `rougeLsum`
splits summaries into sentences at newlines: put one sentence per line.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-N and ROUGE-L F-measures between generated and reference texts.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL workshop 2004.",
            inputs_description="predictions: generated texts; references: one reference text, or a list of "
                               "them (the best-matching one counts) per prediction",
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True,
                 tokenizer=None):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        per_type = {t: [] for t in rouge_types}
        for prediction, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores = scorer.score_multi(refs, prediction)
            for t in rouge_types:
                per_type[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return per_type
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_type.items()}
