"""The simulated lab: dataset-backed ground truth behind the adapter contract."""
