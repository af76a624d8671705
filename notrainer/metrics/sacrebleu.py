"""Corpus BLEU as a local `evaluate` module (sacrebleu), so it works offline.

`score` is in [0, 100], with sacrebleu's defaults (13a tokenization, exponential smoothing).
Each prediction has one reference or a list of references (every list the same length).
"""

import datasets
import evaluate
import sacrebleu


def transpose_references(references):
    """[[ref1, ref2] per prediction] -> sacrebleu's [[ref1 of each prediction], [ref2 ...]]."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    n = len(refs[0]) if refs else 1
    if any(len(r) != n for r in refs):
        raise ValueError("sacrebleu needs the same number of references for every prediction")
    return [[r[i] for r in refs] for i in range(n)]


#: generated texts against one reference text, or a list of them, per prediction
TEXT_FEATURES = [
    datasets.Features({"predictions": datasets.Value("string"),
                       "references": datasets.Sequence(datasets.Value("string"))}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus-level BLEU computed by sacrebleu.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: generated texts; references: a reference text or a list of them "
                               "per prediction",
            features=TEXT_FEATURES,
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False, smooth_method="exp",
                 smooth_value=None, use_effective_order=False):
        bleu = sacrebleu.corpus_bleu(predictions, transpose_references(references), tokenize=tokenize,
                                     lowercase=lowercase, smooth_method=smooth_method, smooth_value=smooth_value,
                                     use_effective_order=use_effective_order)
        return {"score": bleu.score, "counts": bleu.counts, "totals": bleu.totals, "precisions": bleu.precisions,
                "bp": bleu.bp, "sys_len": bleu.sys_len, "ref_len": bleu.ref_len}
