"""flexp examples: a user package bringing its own model, dataset, algorithms and callback (see
docs/bring-your-own.md). Importable with `PYTHONPATH=examples` from the repository root."""
