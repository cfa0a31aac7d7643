"""Pretraining tasks (autoencoders, pretext tasks, GAN): policies over the stage runner."""
