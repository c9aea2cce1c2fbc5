"""Fine-tuning: domain data, LoRA training, the evaluation gate, artifacts and promotion (see pipeline.py)."""
