"""`fastcur.continual`: the continual-learning benchmark (`fastcur continual`).

Data side: a byte-level tokenizer, five built-in synthetic tasks, a synthetic world for
pretraining (with format primers) and the knowledge probe, JSONL loaders for users' data, the evaluation
(accuracy, perplexity), the cached tiny pretrained base model, metrics and the report.
`transformers` and `matplotlib` are imported only when a function needs them.
"""
from .data_files import load_jsonl_examples, load_jsonl_task
from .evaluate import accuracy, lm_batches, perplexity, predict, training_batch
from .metrics import (average_accuracy, average_accuracy_curve, backward_transfer, forgetting, retention,
                      retention_curve)
from .pretrain import base_world, default_cache_dir, pretrain_info, pretrained_base, tiny_llama_config
from .report import (aggregate_seeds, format_table, plot_accuracy_matrices, plot_curves,
                     plot_stability_plasticity, write_markdown_report, write_results_json)
from .tasks import Example, Task, builtin_task_names, builtin_tasks, make_task
from .tokenizer import ByteTokenizer, load_tokenizer
from .world import World, build_world

__all__ = ["ByteTokenizer", "load_tokenizer", "Example", "Task", "builtin_tasks", "builtin_task_names",
           "make_task", "load_jsonl_task", "load_jsonl_examples", "World", "build_world", "accuracy",
           "perplexity", "predict", "lm_batches", "training_batch", "average_accuracy", "average_accuracy_curve",
           "backward_transfer", "forgetting", "retention", "retention_curve", "tiny_llama_config",
           "pretrained_base", "pretrain_info", "base_world", "default_cache_dir", "format_table", "write_results_json",
           "plot_curves", "plot_accuracy_matrices", "plot_stability_plasticity", "aggregate_seeds",
           "write_markdown_report"]
