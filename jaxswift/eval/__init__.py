"""Evaluation: tasks (formats -> items), scoring (log-likelihood, generation + extraction), runner, report.

    from jaxswift.eval import load_tasks, make_evaluator
    evaluator = make_evaluator(load_tasks(["builtin"]), tokenizer, cfg, limit=20)
    evaluator(params)   # {"identity/regex_match": 0.85, "general_mcq/acc": 0.5, ...}
"""

from jaxswift.eval.runner import TaskResult, evaluate, flat_metrics, make_evaluator
from jaxswift.eval.targets import EvalError, InProcessTarget, RemoteTarget
from jaxswift.eval.tasks import FORMATS, Item, Task, builtin_tasks, load_task, load_tasks

__all__ = ["FORMATS", "EvalError", "InProcessTarget", "Item", "RemoteTarget", "Task", "TaskResult", "builtin_tasks",
           "evaluate", "flat_metrics", "load_task", "load_tasks", "make_evaluator"]
