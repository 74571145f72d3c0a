"""The built-in toy model: synthetic shapes data, measures and the training script."""
