"""tp.model: the model wing: tensor-parallel layers, a Llama-style model, checkpoint
loading and sharding, outlier calibration, and the ``python -m tp`` launcher."""
