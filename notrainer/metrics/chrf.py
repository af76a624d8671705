"""chrF (and chrF++ with word_order=2) as a local `evaluate` module (sacrebleu), offline.

`score` is in [0, 100]: a character n-gram F-score, robust for morphologically rich languages.
"""

import evaluate
import sacrebleu

from notrainer.metrics.sacrebleu import TEXT_FEATURES, transpose_references


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus-level chrF / chrF++ computed by sacrebleu.",
            citation="Popović, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description="predictions: generated texts; references: a reference text or a list of them "
                               "per prediction",
            features=TEXT_FEATURES,
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False,
                 whitespace=False):
        chrf = sacrebleu.CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase,
                              whitespace=whitespace)
        score = chrf.corpus_score(predictions, transpose_references(references))
        return {"score": score.score, "char_order": char_order, "word_order": word_order, "beta": beta}
