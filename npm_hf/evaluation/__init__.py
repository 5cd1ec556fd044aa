"""Zero-shot evaluation of NPMs and parametric masked LMs on the paper's tasks (`npm-hf evaluate`)."""

from .cloze import build_cloze_set, lexical_cloze_baseline
from .evaluator import EvaluationArguments, evaluate, record_results_in_card, results_to_markdown, save_results
from .metrics import bucketed_exact_match, normalize_answer
from .tasks import TASKS, Task, get_task, load_examples


__all__ = ["EvaluationArguments", "TASKS", "Task", "build_cloze_set", "bucketed_exact_match", "evaluate", "get_task",
           "lexical_cloze_baseline", "load_examples", "normalize_answer", "record_results_in_card",
           "results_to_markdown", "save_results"]
