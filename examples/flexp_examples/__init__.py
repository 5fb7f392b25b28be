"""flexp examples: a user package bringing its own model, dataset, algorithms and callback (see the README's
"Bring your own"). Importable with `PYTHONPATH=examples` from the repository root."""
