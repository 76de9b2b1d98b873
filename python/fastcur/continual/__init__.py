"""`fastcur.continual`: the continual-learning benchmark (`fastcur continual`).

Data side: a byte-level tokenizer, five built-in synthetic tasks, a synthetic world for
pretraining and the basic-knowledge probe, JSONL loaders for users' data, and the evaluation
(accuracy, perplexity). `transformers` and `matplotlib` are imported only by the modules that
need them (pretrain, report).
"""
from .data_files import load_jsonl_examples, load_jsonl_task
from .evaluate import accuracy, lm_batches, perplexity, predict, training_batch
from .tasks import Example, Task, builtin_task_names, builtin_tasks, make_task
from .tokenizer import ByteTokenizer, load_tokenizer
from .world import World, build_world

__all__ = ["ByteTokenizer", "load_tokenizer", "Example", "Task", "builtin_tasks", "builtin_task_names",
           "make_task", "load_jsonl_task", "load_jsonl_examples", "World", "build_world", "accuracy",
           "perplexity", "predict", "lm_batches", "training_batch"]
