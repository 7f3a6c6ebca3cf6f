"""Stock Flower legacy-workflow app (NumPyClient, DefaultWorkflow, optional SecAgg+)."""
