"""What the Hugging Face `run_*_no_trainer.py` scripts call our results, so that a script's
test or dashboard keeps reading all_results.json (docs/hf-scripts.md).

Our names stay (`eval_perplexity`, `eval_exact_match`); the scripts' names are written beside
them with the same values.
"""

from __future__ import annotations

#: task name -> {the scripts' result name: ours}
SCRIPT_RESULT_NAMES: dict[str, dict[str, str]] = {
    "clm": {"perplexity": "eval_perplexity"},  # run_clm_no_trainer.py
    "mlm": {"perplexity": "eval_perplexity"},  # run_mlm_no_trainer.py
    "qa": {"eval_exact": "eval_exact_match"},  # run_qa_no_trainer.py (the squad_v2 metric's name)
}


def script_results(task_name: str, results: dict) -> dict:
    """The scripts' names for `results` of a `task_name` run (only those not already there)."""
    names = SCRIPT_RESULT_NAMES.get(task_name, {})
    return {theirs: results[ours] for theirs, ours in names.items() if ours in results and theirs not in results}


class ScriptResults:
    """A loop event: at the end of a finished run, the scripts' names join all_results.json."""

    def __init__(self, task_name: str):
        self.task_name = task_name

    def on_train_end(self, loop, results) -> None:
        add_script_results(loop, self.task_name)


def add_script_results(loop, task_name: str) -> dict:
    """Add the scripts' names to the loop's results and rewrite all_results.json (main process)."""
    extra = script_results(task_name, loop.results)
    if extra:
        loop.results.update(extra)
        loop.write_results()
    return loop.results
