"""Training the article's model and reading its runs: `train` (the recipe, resumable, DDP), `evaluate`
(accuracy, confusion, FLOPs) and `plots` (curves, gammas)."""
