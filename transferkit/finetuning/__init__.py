"""Fine-tuning: the classifier (base + head), its stages, semi-supervised phases, the head-stage cache."""
